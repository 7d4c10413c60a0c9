//! What a check concludes and how a monitoring system reads it: the
//! plugin contract of Nagios and Icinga (one status line, perfdata after
//! `|`, exit status 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), or the same
//! facts as one JSON object with `--json`.

use serde_json::{json, Value};

/// The plugin's verdict, in the order Nagios ranks them: the worst finding
/// of a check is its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    /// The probe itself could not judge: bad arguments, or a precondition
    /// of the check that is not the daemon's fault (an image not cached).
    Unknown = 3,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }

    /// The process exit status the contract assigns.
    pub fn exit_code(self) -> u8 {
        self as u8
    }
}

/// One perfdata item: `label=value[UOM];warn;crit;min;max`, empty fields
/// where there is nothing to say (Nagios plugin guidelines, "Performance
/// data").
#[derive(Debug, Clone, PartialEq)]
pub struct Perf {
    pub label: &'static str,
    pub value: f64,
    /// `""`, `s`, `%` or `B`.
    pub unit: &'static str,
    pub warn: Option<f64>,
    pub crit: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Perf {
    /// A plain gauge with a floor of 0.
    pub fn gauge(label: &'static str, value: f64, unit: &'static str) -> Perf {
        Perf {
            label,
            value,
            unit,
            warn: None,
            crit: None,
            min: Some(0.0),
            max: None,
        }
    }

    pub fn warn_at(mut self, w: f64) -> Perf {
        self.warn = Some(w);
        self
    }

    pub fn crit_at(mut self, c: f64) -> Perf {
        self.crit = Some(c);
        self
    }

    pub fn max(mut self, m: f64) -> Perf {
        self.max = Some(m);
        self
    }

    fn render(&self) -> String {
        let opt = |x: Option<f64>| x.map(number).unwrap_or_default();
        let mut s = format!(
            "{}={}{};{};{};{};{}",
            self.label,
            number(self.value),
            self.unit,
            opt(self.warn),
            opt(self.crit),
            opt(self.min),
            opt(self.max)
        );
        // Trailing empty fields may be left out.
        while s.ends_with(';') {
            s.pop();
        }
        s
    }

    fn json(&self) -> Value {
        json!({
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "warn": self.warn,
            "crit": self.crit,
            "min": self.min,
            "max": self.max,
        })
    }
}

/// A number as a monitoring system reads it: `80`, not `80.0`; at most
/// three decimals.
fn number(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_owned()
    }
}

/// What a check found: every finding with its own status, and the perfdata.
#[derive(Debug, Default)]
pub struct Verdict {
    findings: Vec<(Status, String)>,
    pub perf: Vec<Perf>,
}

impl Verdict {
    pub fn new() -> Verdict {
        Verdict::default()
    }

    /// A verdict of one finding, for checks that cannot go on.
    pub fn only(status: Status, text: impl Into<String>) -> Verdict {
        let mut v = Verdict::new();
        v.add(status, text);
        v
    }

    pub fn add(&mut self, status: Status, text: impl Into<String>) {
        self.findings.push((status, text.into()));
    }

    /// The worst finding's status; OK when nothing was found wrong.
    pub fn status(&self) -> Status {
        self.findings
            .iter()
            .map(|(s, _)| *s)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// Findings, problems first (worst first, otherwise in the order
    /// found), so the start of the line says what is wrong.
    fn ranked(&self) -> Vec<&(Status, String)> {
        let mut f: Vec<_> = self.findings.iter().collect();
        f.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
        f
    }

    /// The plugin output: `STRATUS <WHAT> <STATUS> - findings | perfdata`.
    /// One line: a finding's own line breaks become spaces.
    pub fn line(&self, what: &str) -> String {
        let text = self
            .ranked()
            .iter()
            .map(|(_, t)| t.replace(['\n', '\r', '|'], " "))
            .collect::<Vec<_>>()
            .join(", ");
        let mut line = format!("STRATUS {what} {} - {text}", self.status().word());
        if !self.perf.is_empty() {
            line.push_str(" | ");
            line.push_str(
                &self
                    .perf
                    .iter()
                    .map(Perf::render)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        line
    }

    /// The same facts for `--json`.
    pub fn json(&self, check: &str) -> Value {
        let status = self.status();
        json!({
            "check": check,
            "status": status.word(),
            "exit_code": status.exit_code(),
            "findings": self.ranked().iter().map(|(s, t)| json!({
                "status": s.word(),
                "text": t,
            })).collect::<Vec<_>>(),
            "perfdata": self.perf.iter().map(Perf::json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_leads_with_the_worst_finding_and_carries_perfdata() {
        let mut v = Verdict::new();
        v.add(Status::Ok, "pool 3% full");
        v.add(Status::Warning, "2 drift");
        v.add(Status::Ok, "fine");
        v.perf.push(Perf::gauge("drift", 2.0, "").warn_at(1.0));
        v.perf.push(
            Perf::gauge("fill", 3.25, "%")
                .warn_at(80.0)
                .crit_at(90.0)
                .max(100.0),
        );
        assert_eq!(v.status(), Status::Warning, "a later OK never lowers it");
        assert_eq!(
            v.line("PDISK"),
            "STRATUS PDISK WARNING - 2 drift, pool 3% full, fine | drift=2;1;;0 fill=3.25%;80;90;0;100"
        );
    }

    #[test]
    fn exit_codes_are_the_plugin_contract() {
        assert_eq!(Verdict::new().status().exit_code(), 0);
        assert_eq!(Status::Warning.exit_code(), 1);
        assert_eq!(Status::Critical.exit_code(), 2);
        assert_eq!(Status::Unknown.exit_code(), 3);
        assert!(Status::Unknown > Status::Critical);
    }

    #[test]
    fn a_finding_never_breaks_the_line_or_starts_perfdata() {
        let v = Verdict::only(Status::Critical, "tgtd said\nno | more");
        assert_eq!(
            v.line("PDISK"),
            "STRATUS PDISK CRITICAL - tgtd said no   more"
        );
    }

    #[test]
    fn json_carries_the_same_facts() {
        let mut v = Verdict::only(Status::Critical, "down");
        v.perf.push(Perf::gauge("time", 0.5, "s"));
        let j = v.json("agent");
        assert_eq!(j["status"], "CRITICAL");
        assert_eq!(j["exit_code"], 2);
        assert_eq!(j["findings"][0]["text"], "down");
        assert_eq!(j["perfdata"][0]["unit"], "s");
        assert_eq!(j["perfdata"][0]["warn"], Value::Null);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(80.0), "80");
        assert_eq!(number(92.5), "92.5");
        assert_eq!(number(0.0034), "0.003");
        assert_eq!(number(1073741824.0), "1073741824");
        assert_eq!(number(0.0), "0");
    }
}
