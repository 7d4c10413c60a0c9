//! Scraping a daemon's `/metrics` with a real HTTP client and reading the
//! Prometheus text back ([`Scrape`]), for tests that assert counts.

use std::collections::BTreeMap;

/// One scrape: every sample by metric name, each with its labels.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// GETs `http://ADDR/metrics` (in the calling thread's network namespace)
/// and parses it; panics on anything but 200 with Prometheus' text type.
pub async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    // reqwest is built without a TLS provider of its own (the agent's
    // choice); plain HTTP still needs one installed to build a client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    assert_eq!(resp.status(), 200, "scraping {addr}");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    Scrape::parse(&resp.text().await.unwrap())
}

impl Scrape {
    /// Parses the text exposition format: `name{a="x",b="y"} value`.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("sample line: name value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match head.split_once('{') {
                None => (head.to_owned(), BTreeMap::new()),
                Some((n, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    (n.to_owned(), parse_labels(body))
                }
            };
            samples.push((name, labels, value));
        }
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the one sample of `name` whose labels include all of
    /// `labels`; None when there is none; panics when there are several.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            found.len() <= 1,
            "several samples of {name} {labels:?}:\n{}",
            self.text
        );
        found.first().copied()
    }

    /// Like [`Scrape::get`], panicking with the whole scrape when missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{}", self.text))
    }

    /// Every label set of `name`.
    pub fn series(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, _)| l.clone())
            .collect()
    }
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => break,
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), value);
        rest = after[end..].trim_start_matches(',');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_back_with_escaped_labels() {
        let s = Scrape::parse(
            "# HELP x_total x\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"uo,te\"} 3\nup 1\nh_bucket{le=\"+Inf\"} 2\n",
        );
        assert_eq!(s.value("x_total", &[("b", "q\"uo,te")]), 3.0);
        assert_eq!(s.value("x_total", &[("a", "1")]), 3.0);
        assert_eq!(s.value("up", &[]), 1.0);
        assert_eq!(s.value("h_bucket", &[("le", "+Inf")]), 2.0);
        assert_eq!(s.get("x_total", &[("a", "2")]), None);
    }
}
