use std::collections::BTreeMap;

/// One `PROBE RESULT <workload> key=value ...` line.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub workload: String,
    pub values: BTreeMap<String, String>,
}

impl ProbeResult {
    /// The value of `key` parsed as a number.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.values.get(key)?.parse().ok()
    }
}

/// What the probe guest printed on its serial console.
#[derive(Debug, Clone, Default)]
pub struct ProbeOutput {
    pub ready: bool,
    pub results: Vec<ProbeResult>,
    /// `Some(Ok(()))` for `PROBE DONE ok`, `Some(Err(why))` for `PROBE DONE fail: why`.
    pub done: Option<Result<(), String>>,
}

impl ProbeOutput {
    pub fn parse(console: &str) -> Self {
        let mut out = ProbeOutput::default();
        for line in console.lines().map(str::trim_end) {
            if line == "PROBE READY" {
                out.ready = true;
            } else if let Some(rest) = line.strip_prefix("PROBE RESULT ") {
                out.results.push(parse_result(rest));
            } else if line == "PROBE DONE ok" {
                out.done = Some(Ok(()));
            } else if let Some(why) = line.strip_prefix("PROBE DONE fail: ") {
                out.done = Some(Err(why.to_owned()));
            }
        }
        out
    }

    /// The results of one workload, in order.
    pub fn results_of<'a>(&'a self, workload: &'a str) -> impl Iterator<Item = &'a ProbeResult> {
        self.results.iter().filter(move |r| r.workload == workload)
    }
}

fn parse_result(rest: &str) -> ProbeResult {
    let mut words = rest.split_whitespace();
    let workload = words.next().unwrap_or_default().to_owned();
    let values = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    ProbeResult { workload, values }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_run() {
        let out = ProbeOutput::parse(
            "boot noise\nPROBE READY\nPROBE RESULT cpu events_s=12.5 primes=10\nPROBE DONE ok\n",
        );
        assert!(out.ready);
        let cpu: Vec<_> = out.results_of("cpu").collect();
        assert_eq!(cpu.len(), 1);
        assert_eq!(cpu[0].num("events_s"), Some(12.5));
        assert_eq!(out.done, Some(Ok(())));
    }

    #[test]
    fn parses_a_failure() {
        let out = ProbeOutput::parse("PROBE READY\nPROBE DONE fail: verify mismatch at 0x1000\n");
        assert_eq!(out.done, Some(Err("verify mismatch at 0x1000".into())));
        assert!(out.results.is_empty());
    }
}
