//! Prometheus metrics as the tests read them: a service's `/metrics` text, and the value of a
//! metric over the series that carry given labels.
use std::net::SocketAddr;

/// The Prometheus text the admin server at `admin` serves on `/metrics`.
pub async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{admin}/metrics")).await?.error_for_status()?.text().await?)
}

/// The value of metric `name` over the series whose labels include every one of `labels`
/// (whatever others they have), summed as `sum(name{labels})` would; `None` when `text` has
/// no such series. An unlabelled counter is `metric(text, name, &[])`; a histogram's parts are
/// metrics of their own (`…_count`, `…_sum`, `…_bucket` with `le`).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter_map(Sample::parse)
        .filter(|sample| sample.name == name && labels.iter().all(|&(k, v)| sample.label(k) == Some(v)))
        .map(|sample| sample.value)
        .reduce(|a, b| a + b)
}

/// One sample line: `name{label="value",…} value [timestamp]`.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl<'a> Sample<'a> {
    /// A sample; `None` for a comment, a blank line or anything malformed.
    fn parse(line: &'a str) -> Option<Self> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (name, mut rest) = line.split_at(line.find(|c: char| c == '{' || c.is_whitespace())?);
        let mut labels = Vec::new();
        if let Some(inside) = rest.strip_prefix('{') {
            rest = inside;
            loop {
                rest = rest.trim_start_matches([',', ' ']);
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = rest.split_once("=\"")?;
                let (value, after) = quoted(after)?;
                labels.push((key.trim(), value));
                rest = after;
            }
        }
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Self { name, labels, value })
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }
}

/// A label value up to its closing quote, unescaped (`\\`, `\"`, `\n`), and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                escaped => value.push(escaped),
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP millrace_batcher_dispatches_total Batches dispatched
# TYPE millrace_batcher_dispatches_total counter
millrace_batcher_dispatches_total{model="m1",reason="idle"} 2
millrace_batcher_dispatches_total{model="m1",reason="size"} 1
millrace_batcher_dispatches_total{model="m2",reason="idle"} 3
millrace_batcher_cancel_notices_total 4
millrace_batcher_cancel_notices_total_other 100
millrace_batch_size_bucket{model="m1",le="+Inf"} 5
millrace_batch_size_sum{model="m1"} 9.5
millrace_dlq_total{reason="say \"no\"\n",stage="a\\b"} 1 1700000000000
"#;

    #[test]
    fn a_series_is_found_by_name_and_a_subset_of_its_labels() {
        let dispatches = "millrace_batcher_dispatches_total";
        assert_eq!(metric(TEXT, dispatches, &[("model", "m1"), ("reason", "idle")]), Some(2.0));
        assert_eq!(metric(TEXT, dispatches, &[("reason", "idle")]), Some(5.0), "summed over the models");
        assert_eq!(metric(TEXT, dispatches, &[]), Some(6.0));
        assert_eq!(metric(TEXT, dispatches, &[("reason", "wait")]), None);
        assert_eq!(metric(TEXT, "millrace_batcher_cancel_notices_total", &[]), Some(4.0), "not its longer namesake");
        assert_eq!(metric(TEXT, "millrace_batch_size_bucket", &[("le", "+Inf")]), Some(5.0));
        assert_eq!(metric(TEXT, "millrace_batch_size_sum", &[("model", "m1")]), Some(9.5));
        assert_eq!(metric(TEXT, "millrace_absent_total", &[]), None);
    }

    #[test]
    fn label_values_are_unescaped_and_timestamps_ignored() {
        let line = TEXT.lines().last().unwrap();
        let sample = Sample::parse(line).unwrap();
        assert_eq!(sample.labels, [("reason", "say \"no\"\n".to_owned()), ("stage", "a\\b".to_owned())]);
        assert_eq!(sample.value, 1.0);
        assert_eq!(Sample::parse("# TYPE x counter"), None);
        assert_eq!(Sample::parse("broken{reason=\"unclosed} 1"), None);
    }
}
