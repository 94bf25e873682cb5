//! Prometheus metrics of the KMS front and the tokens, in the text exposition format.
//!
//! Hand-written: a few counters and one histogram family do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use std::sync::atomic::Ordering;

use hsm::TokenHealth;

use crate::service::Service;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Default)]
struct OpStats {
    requests: u64,
    /// Refused or failed requests by exception name.
    errors: BTreeMap<&'static str, u64>,
    buckets: [u64; BUCKETS.len()],
    latency_sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    ops: Mutex<BTreeMap<&'static str, OpStats>>,
}

impl Metrics {
    /// Records one request; `error` is the exception name if it failed. `operation` comes from
    /// a fixed set (the caller folds unknown names into "Unknown"): each value makes a series.
    pub fn observe(&self, operation: &'static str, latency: Duration, error: Option<&'static str>) {
        let seconds = latency.as_secs_f64();
        let mut ops = self.ops.lock().unwrap();
        let stats = ops.entry(operation).or_default();
        stats.requests += 1;
        stats.latency_sum += seconds;
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            stats.buckets[i] += 1;
        }
        if let Some(code) = error {
            *stats.errors.entry(code).or_default() += 1;
        }
    }

    /// The exposition text: request and error counters and latency per operation; per key
    /// store its connection, each token's state, worker restarts and failovers; the prober's
    /// work; the backup catalogue.
    pub fn render(&self, service: &Service, backups: Option<BackupSummary>) -> String {
        let mut out = String::with_capacity(4096);
        let ops = self.ops.lock().unwrap();
        out.push_str("# HELP hsmkms_requests_total KMS API requests by operation.\n# TYPE hsmkms_requests_total counter\n");
        for (op, s) in ops.iter() {
            let _ = writeln!(
                out,
                "hsmkms_requests_total{{operation=\"{op}\"}} {}",
                s.requests
            );
        }
        out.push_str("# HELP hsmkms_errors_total KMS API requests that failed, by operation and exception.\n# TYPE hsmkms_errors_total counter\n");
        for (op, s) in ops.iter() {
            for (code, n) in &s.errors {
                let _ = writeln!(
                    out,
                    "hsmkms_errors_total{{operation=\"{op}\",exception=\"{code}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP hsmkms_request_duration_seconds KMS API request latency.\n# TYPE hsmkms_request_duration_seconds histogram\n");
        for (op, s) in ops.iter() {
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(s.buckets.iter()) {
                cumulative += n;
                let _ = writeln!(out, "hsmkms_request_duration_seconds_bucket{{operation=\"{op}\",le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "hsmkms_request_duration_seconds_bucket{{operation=\"{op}\",le=\"+Inf\"}} {}",
                s.requests
            );
            let _ = writeln!(
                out,
                "hsmkms_request_duration_seconds_sum{{operation=\"{op}\"}} {}",
                s.latency_sum
            );
            let _ = writeln!(
                out,
                "hsmkms_request_duration_seconds_count{{operation=\"{op}\"}} {}",
                s.requests
            );
        }
        drop(ops);
        self.render_stores(&mut out, service);
        if let Some(b) = backups {
            out.push_str("# HELP hsmkms_backups Backups recorded in the catalogue (hsmkms backup list).\n# TYPE hsmkms_backups gauge\n");
            let _ = writeln!(out, "hsmkms_backups {}", b.count);
            if let Some(last) = b.last {
                out.push_str("# HELP hsmkms_last_backup_timestamp_seconds When the newest backup was made.\n# TYPE hsmkms_last_backup_timestamp_seconds gauge\n");
                let _ = writeln!(
                    out,
                    "hsmkms_last_backup_timestamp_seconds {}",
                    last.created_ms as f64 / 1000.0
                );
                out.push_str("# HELP hsmkms_last_backup_keys Keys in the newest backup.\n# TYPE hsmkms_last_backup_keys gauge\n");
                let _ = writeln!(out, "hsmkms_last_backup_keys {}", last.keys);
            }
        }
        out
    }

    /// Per key store: its connection, each token's state and worker restarts, failovers; and
    /// the prober's work.
    fn render_stores(&self, out: &mut String, service: &Service) {
        let stores = service.key_stores();
        out.push_str("# HELP hsmkms_key_store_connected Whether a custom key store is connected (1) or not (0).\n# TYPE hsmkms_key_store_connected gauge\n");
        for s in &stores {
            let _ = writeln!(
                out,
                "hsmkms_key_store_connected{{key_store=\"{}\"}} {}",
                LabelValue(&s.id()),
                u8::from(s.cluster().is_some())
            );
        }
        let clusters: Vec<_> = stores
            .iter()
            .filter_map(|s| s.cluster().map(|c| (s.id(), c)))
            .collect();
        out.push_str("# HELP hsmkms_token_up Whether a token of a connected key store can serve (1) or not (0).\n# TYPE hsmkms_token_up gauge\n");
        for (store, cluster) in &clusters {
            for t in cluster.status() {
                token_sample(
                    out,
                    "hsmkms_token_up",
                    store,
                    cluster.id(),
                    &t.label,
                    u8::from(t.health == TokenHealth::Up).into(),
                );
            }
        }
        out.push_str("# HELP hsmkms_worker_restarts_total Token worker processes replaced.\n# TYPE hsmkms_worker_restarts_total counter\n");
        for (store, cluster) in &clusters {
            for t in cluster.status() {
                token_sample(
                    out,
                    "hsmkms_worker_restarts_total",
                    store,
                    cluster.id(),
                    &t.label,
                    t.worker_restarts,
                );
            }
        }
        out.push_str("# HELP hsmkms_failovers_total Requests retried on another token after one failed.\n# TYPE hsmkms_failovers_total counter\n");
        for (store, cluster) in &clusters {
            let _ = writeln!(
                out,
                "hsmkms_failovers_total{{key_store=\"{}\",cluster=\"{}\"}} {}",
                LabelValue(store),
                LabelValue(cluster.id()),
                cluster.failovers()
            );
        }
        let c = &service.counters;
        for (name, help, value) in [
            (
                "hsmkms_probes_total",
                "Passes of the token prober.",
                &c.probes,
            ),
            (
                "hsmkms_probe_failures_total",
                "Prober passes that failed.",
                &c.probe_failures,
            ),
            (
                "hsmkms_probe_keys_copied_total",
                "Keys the prober copied to tokens that missed them.",
                &c.keys_copied,
            ),
            (
                "hsmkms_probe_keys_destroyed_total",
                "Keys the prober destroyed on tokens that missed their deletion.",
                &c.keys_destroyed,
            ),
            (
                "hsmkms_keys_deleted_total",
                "Keys deleted at the end of their waiting period.",
                &c.keys_deleted,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

/// One sample of a per-token metric.
fn token_sample(
    out: &mut String,
    metric: &str,
    store: &str,
    cluster: &str,
    token: &str,
    value: u64,
) {
    let _ = writeln!(
        out,
        "{metric}{{key_store=\"{}\",cluster=\"{}\",token=\"{}\"}} {value}",
        LabelValue(store),
        LabelValue(cluster),
        LabelValue(token)
    );
}

/// A label value as the text exposition format wants it: `\`, `"` and newline escaped. Token
/// labels and store ids come from the metadata and the tokens, not from us.
struct LabelValue<'a>(&'a str);

impl std::fmt::Display for LabelValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for part in self.0.split_inclusive(['\\', '"', '\n']) {
            match part.as_bytes().last() {
                Some(b'\\') => write!(f, "{}\\\\", &part[..part.len() - 1])?,
                Some(b'"') => write!(f, "{}\\\"", &part[..part.len() - 1])?,
                Some(b'\n') => write!(f, "{}\\n", &part[..part.len() - 1])?,
                _ => f.write_str(part)?,
            }
        }
        Ok(())
    }
}

/// What `/metrics` tells of the backup catalogue.
pub struct BackupSummary {
    pub count: usize,
    pub last: Option<crate::store::BackupRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        token_sample(&mut out, "m", "cks-1", "cl", "a\"b\\c\nd} 1\nforged 9", 1);
        assert_eq!(
            out,
            "m{key_store=\"cks-1\",cluster=\"cl\",token=\"a\\\"b\\\\c\\nd} 1\\nforged 9\"} 1\n"
        );
        assert_eq!(
            out.lines().count(),
            1,
            "a label must not start a sample of its own"
        );
    }

    #[test]
    fn latency_lands_in_cumulative_buckets() {
        let m = Metrics::default();
        m.observe("Encrypt", Duration::from_micros(300), None);
        m.observe(
            "Encrypt",
            Duration::from_millis(3),
            Some("DisabledException"),
        );
        let ops = m.ops.lock().unwrap();
        let e = &ops["Encrypt"];
        assert_eq!(e.requests, 2);
        assert_eq!(e.buckets[2], 1, "300 µs <= 500 µs");
        assert_eq!(e.buckets[5], 1, "3 ms <= 5 ms");
        assert_eq!(e.errors["DisabledException"], 1);
    }
}
