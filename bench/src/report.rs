//! Figures and how they are written: `results.json` (every figure with its
//! peer and the ratio), `results.md` (a table per scenario) and one SVG bar
//! chart per scenario, comparing each figure with its peer.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// One measured number, with the peer it is compared to.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figure {
    pub scenario: String,
    /// What was measured, e.g. "seq read 128k qd32 (export)".
    pub name: String,
    /// "MB/s", "IOPS", "ms", ...
    pub unit: String,
    pub value: f64,
    /// The peer's name and value, measured in the same run.
    pub peer: Option<String>,
    pub peer_value: Option<f64>,
    /// value / peer_value.
    pub ratio: Option<f64>,
    /// Raw samples behind `value` (e.g. latencies), when there are several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
    /// Raw samples behind `peer_value`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_samples: Vec<f64>,
}

impl Figure {
    pub fn new(scenario: &str, name: &str, unit: &str, value: f64) -> Figure {
        Figure {
            scenario: scenario.into(),
            name: name.into(),
            unit: unit.into(),
            value,
            peer: None,
            peer_value: None,
            ratio: None,
            samples: Vec::new(),
            peer_samples: Vec::new(),
        }
    }

    /// Sets the peer and computes the ratio.
    pub fn against(mut self, peer: &str, peer_value: f64) -> Figure {
        self.peer = Some(peer.into());
        self.peer_value = Some(peer_value);
        self.ratio = (peer_value != 0.0).then(|| self.value / peer_value);
        self
    }

    pub fn with_samples(mut self, samples: Vec<f64>) -> Figure {
        self.samples = samples;
        self
    }

    pub fn with_peer_samples(mut self, samples: Vec<f64>) -> Figure {
        self.peer_samples = samples;
        self
    }
}

/// The p-th percentile (0..=100) of `samples`, nearest-rank.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: String,
    pub started_at: String,
    pub quick: bool,
    pub figures: Vec<Figure>,
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The Markdown report: one table per scenario.
pub fn markdown(r: &Results) -> String {
    let mut out = format!(
        "# stratus-bench results\n\nMachine: {}  \nStarted: {}{}\n",
        r.machine,
        r.started_at,
        if r.quick {
            "  \nMode: --quick (smoke run: sizes too small for real figures)"
        } else {
            ""
        }
    );
    let mut scenarios: Vec<&str> = r.figures.iter().map(|f| f.scenario.as_str()).collect();
    scenarios.dedup();
    for s in scenarios {
        let _ = write!(out, "\n## {s}\n\n| measure | value | unit | peer | peer value | ratio |\n|---|---:|---|---|---:|---:|\n");
        for f in r.figures.iter().filter(|f| f.scenario == s) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                f.name,
                fmt_num(f.value),
                f.unit,
                f.peer.as_deref().unwrap_or("-"),
                f.peer_value.map(fmt_num).unwrap_or_else(|| "-".into()),
                f.ratio
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    out
}

/// A horizontal bar chart of a scenario's figures (value and peer).
pub fn svg(scenario: &str, figures: &[&Figure]) -> String {
    let row = 22.0;
    let label_w = 330.0;
    let bar_w = 400.0;
    let height = 40.0 + row * 2.0 * figures.len() as f64;
    let max = figures
        .iter()
        .flat_map(|f| [Some(f.value), f.peer_value])
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"8\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        label_w + bar_w + 120.0,
        esc(scenario)
    );
    for (i, f) in figures.iter().enumerate() {
        let y = 36.0 + row * 2.0 * i as f64;
        let mut bar = |y: f64, label: &str, v: f64, colour: &str| {
            let w = if v.is_finite() { bar_w * v / max } else { 0.0 };
            let _ = writeln!(
                out,
                "<text x=\"8\" y=\"{:.1}\">{}</text><rect x=\"{label_w}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"16\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{:.1}\">{} </text>",
                y + 12.0,
                esc(label),
                y,
                label_w + w + 4.0,
                y + 12.0,
                fmt_num(v)
            );
        };
        bar(y, &format!("{} ({})", f.name, f.unit), f.value, "#3b7dd8");
        if let (Some(p), Some(pv)) = (&f.peer, f.peer_value) {
            bar(y + row, &format!("  peer: {p}"), pv, "#aaaaaa");
        }
    }
    out.push_str("</svg>\n");
    out
}

/// Writes results.json, results.md and one SVG per scenario into `dir`.
pub fn write(dir: &Path, r: &Results) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(dir.join("results.md"), markdown(r))?;
    let mut scenarios: Vec<&str> = r.figures.iter().map(|f| f.scenario.as_str()).collect();
    scenarios.dedup();
    for s in scenarios {
        let figs: Vec<&Figure> = r.figures.iter().filter(|f| f.scenario == s).collect();
        let file: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        std::fs::write(dir.join(format!("{file}.svg")), svg(s, &figs))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_ratios_and_outputs() {
        let s = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&s, 50.0), 3.0);
        assert_eq!(percentile(&s, 95.0), 5.0);
        let f = Figure::new("data path", "seq read", "MB/s", 50.0).against("local", 100.0);
        assert_eq!(f.ratio, Some(0.5));
        let r = Results {
            machine: "test".into(),
            started_at: "now".into(),
            quick: true,
            figures: vec![f],
        };
        let md = markdown(&r);
        assert!(
            md.contains("| seq read | 50.00 | MB/s | local | 100 | 0.50x |"),
            "{md}"
        );
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &r).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("data-path.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("seq read"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["figures"][0]["ratio"], 0.5);
    }
}
