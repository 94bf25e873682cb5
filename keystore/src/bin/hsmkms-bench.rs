//! Load tool: the KMS façade over signed HTTP against the raw token ceiling, in one run.
//!
//! Sets up a fresh dev store in a temporary directory, starts `hsmkms serve` (a separate process,
//! as in production), and for Encrypt, Decrypt and GenerateDataKey measures, at each concurrency:
//! - the façade: signed HTTP requests from this process to the server;
//! - the raw ceiling: the same token operations sent straight to a pool of the same worker
//!   processes, without HTTP, SigV4, JSON or metadata.
//!
//! It prints ops/s, p50 and p99 latency and the ratio façade/raw. Not a test: numbers depend on
//! the machine. See docs/performance.md.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use hsm::{TokenConfig, TokenPool, WorkerCommand};
use keystore::client::KmsClient;
use keystore::config::Config;
use keystore::dev::{DEV_ACCESS_KEY_ID, DEV_SECRET_ACCESS_KEY};
use secrecy::SecretString;
use zeroize::Zeroizing;

/// Measure the hsmkms KMS façade against the raw PKCS#11 ceiling on the same token.
#[derive(Parser)]
#[command(name = "hsmkms-bench", version, about)]
struct Args {
    /// Concurrency levels (requests in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Worker processes per token, for the server and the raw pool alike (default: CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Tokens in the key store: a cluster sharing a domain key when more than one. The raw
    /// ceiling then spreads over the same tokens.
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Measure an already running hsmkms at HOST:PORT instead of starting one; requires
    /// `--config` (its configuration, for the raw pool) and the dev principal.
    #[arg(long, value_name = "HOST:PORT", requires = "config")]
    endpoint: Option<String>,
    /// The configuration of the server given with `--endpoint`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Operations to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Encrypt,Decrypt,GenerateDataKey"
    )]
    ops: Vec<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Encrypt,
    Decrypt,
    GenerateDataKey,
}

impl Op {
    fn parse(s: &str) -> Result<Op, String> {
        match s {
            "Encrypt" => Ok(Op::Encrypt),
            "Decrypt" => Ok(Op::Decrypt),
            "GenerateDataKey" => Ok(Op::GenerateDataKey),
            other => Err(format!("unknown operation {other}")),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
            Op::GenerateDataKey => "GenerateDataKey",
        }
    }
}

struct Measurement {
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

fn summarise(mut latencies: Vec<u64>, elapsed: Duration, errors: u64) -> Measurement {
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Measurement {
        ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        errors,
    }
}

/// Runs `concurrency` loops of `one` for `seconds`; each loop owns its own state (connection).
async fn drive<S, F, Fut>(
    concurrency: usize,
    seconds: f64,
    make_state: impl Fn() -> S,
    one: F,
) -> Measurement
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = (S, bool)> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let one = one.clone();
        let mut state = make_state();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::with_capacity(1 << 16), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let (s, ok) = one(state).await;
                state = s;
                if ok {
                    latencies.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        all.extend(l);
        errors += e;
    }
    summarise(all, started.elapsed(), errors)
}

fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("own path");
    me.parent().expect("in a directory").join(name)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let ops: Vec<Op> = args
        .ops
        .iter()
        .map(|s| Op::parse(s))
        .collect::<Result<_, _>>()?;
    let hsmkms = sibling("hsmkms");
    if !hsmkms.exists() {
        return Err(format!(
            "{} not found: build the workspace first",
            hsmkms.display()
        ));
    }
    let worker = WorkerCommand {
        program: hsmkms.clone(),
        args: vec!["worker".into()],
    };
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    if let (Some(endpoint), Some(config)) = (&args.endpoint, &args.config) {
        let config = Config::load(config)?;
        return run(&args, &ops, &config, endpoint, worker, workers, None).await;
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config_path = keystore::dev::prepare_cluster(dir.path(), &worker, args.tokens)?;
    // The same worker count for the server as for the raw pool.
    let text = std::fs::read_to_string(&config_path).map_err(|e| e.to_string())?;
    let text = text.replace(
        "[[key_store.tokens]]\n",
        &format!("[[key_store.tokens]]\nworkers = {workers}\n"),
    );
    std::fs::write(&config_path, text).map_err(|e| e.to_string())?;
    let config = Config::load(&config_path)?;

    let mut server = Command::new(&hsmkms)
        .args(["serve", "--config"])
        .arg(&config_path)
        .args(["--listen", "127.0.0.1:0"])
        .env("HSMKMS_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start hsmkms: {e}"))?;
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().expect("piped"))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap_or("")
        .to_string();
    if addr.is_empty() {
        let _ = server.kill();
        return Err(format!("hsmkms did not start: {line:?}"));
    }
    let result = run(
        &args,
        &ops,
        &config,
        &addr,
        worker,
        workers,
        Some(server.id()),
    )
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// CPU time (user + system) a process and its children-in-waiting have used, in µs; Linux
/// reports it in clock ticks of 1/100 s (USER_HZ).
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &Args,
    ops: &[Op],
    config: &Config,
    addr: &str,
    worker: WorkerCommand,
    workers: usize,
    server_pid: Option<u32>,
) -> Result<(), String> {
    let client = || {
        KmsClient::new(
            addr,
            DEV_ACCESS_KEY_ID,
            SecretString::from(DEV_SECRET_ACCESS_KEY),
            &config.region,
        )
    };
    let mut admin = client();
    let created = admin
        .call("CreateKey", &serde_json::json!({"Description": "bench"}))
        .await
        .map_err(|e| e.to_string())?;
    let key_arn = created.body["KeyMetadata"]["Arn"]
        .as_str()
        .ok_or(format!("CreateKey failed: {:?}", created.body))?
        .to_string();
    let key_uuid = created.body["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let key_id = keystore::ids::KeyId::parse(&key_uuid)
        .ok_or("bad key id")?
        .bytes();
    let plaintext = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let encrypted = admin
        .call(
            "Encrypt",
            &serde_json::json!({"KeyId": key_arn, "Plaintext": plaintext}),
        )
        .await
        .map_err(|e| e.to_string())?;
    let blob = encrypted.body["CiphertextBlob"]
        .as_str()
        .ok_or("Encrypt failed")?
        .to_string();

    let mut pools = Vec::new();
    let key_store = config
        .key_store
        .as_ref()
        .ok_or("the configuration has no [key_store] to measure")?;
    for token in &key_store.tokens {
        let token = TokenConfig {
            workers,
            ..keystore::app::token_config(token)?
        };
        pools.push(
            TokenPool::start(token, worker.clone())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let tokens = pools.len();
    let pool = std::sync::Arc::new(hsm::Cluster::new("bench", pools).map_err(|e| e.to_string())?);
    let raw_sealed = pool
        .encrypt(key_id, vec![], Zeroizing::new(vec![7u8; 32]))
        .await
        .map_err(|e| e.to_string())?;

    println!(
        "hsmkms-bench: {tokens} SoftHSM2 token(s), {workers} worker processes each, 32-byte payloads, {} s per point",
        args.seconds
    );
    println!(
        "{:<16} {:>5} | {:>10} {:>8} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>6}",
        "operation",
        "conc",
        "façade/s",
        "p50 µs",
        "p99 µs",
        "srv µs",
        "raw/s",
        "p50 µs",
        "p99 µs",
        "ratio"
    );
    for op in ops {
        let mut best = (0.0f64, 0.0f64);
        for &c in &args.concurrency {
            let raw = {
                let pool = pool.clone();
                let sealed = raw_sealed.clone();
                let op = *op;
                drive(
                    c,
                    args.seconds,
                    || (),
                    move |_| {
                        let (pool, sealed) = (pool.clone(), sealed.clone());
                        async move {
                            let ok = match op {
                                Op::Encrypt => pool
                                    .encrypt(key_id, vec![], Zeroizing::new(vec![7u8; 32]))
                                    .await
                                    .is_ok(),
                                Op::Decrypt => pool.decrypt(key_id, vec![], sealed).await.is_ok(),
                                Op::GenerateDataKey => {
                                    pool.generate_data_key(key_id, vec![], 32).await.is_ok()
                                }
                            };
                            ((), ok)
                        }
                    },
                )
                .await
            };
            let body: Arc<Vec<u8>> = Arc::new(
                serde_json::to_vec(&match op {
                    Op::Encrypt => serde_json::json!({"KeyId": key_arn, "Plaintext": plaintext}),
                    Op::Decrypt => serde_json::json!({"CiphertextBlob": blob}),
                    Op::GenerateDataKey => {
                        serde_json::json!({"KeyId": key_arn, "KeySpec": "AES_256"})
                    }
                })
                .expect("JSON"),
            );
            let name = op.name();
            let cpu_before = server_pid.and_then(cpu_us);
            let facade = drive(c, args.seconds, client, move |mut cl: KmsClient| {
                let body = body.clone();
                async move {
                    let ok = matches!(cl.call_raw(name, &body).await, Ok((200, _)));
                    (cl, ok)
                }
            })
            .await;
            // The service's own CPU per request (HTTP, SigV4, JSON, metadata, pipes; not the
            // token work, which the workers do): what the façade adds, whatever shares the cores.
            let server_us = match (cpu_before, server_pid.and_then(cpu_us)) {
                (Some(a), Some(b)) => format!(
                    "{:.0}",
                    (b - a) as f64 / (facade.ops_per_sec * args.seconds).max(1.0)
                ),
                _ => "-".into(),
            };
            let ratio = facade.ops_per_sec / raw.ops_per_sec.max(1.0);
            println!(
                "{:<16} {:>5} | {:>10.0} {:>8} {:>8} {:>8} | {:>10.0} {:>8} {:>8} | {:>6.2}{}",
                name,
                c,
                facade.ops_per_sec,
                facade.p50_us,
                facade.p99_us,
                server_us,
                raw.ops_per_sec,
                raw.p50_us,
                raw.p99_us,
                ratio,
                if facade.errors + raw.errors > 0 {
                    format!("  ({} errors)", facade.errors + raw.errors)
                } else {
                    String::new()
                }
            );
            best.0 = best.0.max(facade.ops_per_sec);
            best.1 = best.1.max(raw.ops_per_sec);
        }
        println!(
            "{:<16} best  | {:>10.0} {:>26} | {:>10.0} {:>17} | {:>6.2}",
            op.name(),
            best.0,
            "",
            best.1,
            "",
            best.0 / best.1.max(1.0)
        );
    }
    Ok(())
}
