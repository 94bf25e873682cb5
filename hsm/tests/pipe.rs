//! The pipe to a worker under cancelled callers and corrupt frames: every reply reaches the
//! caller that asked, or nobody; never another caller.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm::{HsmError, TokenPool, WorkerCommand};
use support::TestToken;
use zeroize::Zeroizing;

const KEY: [u8; 16] = [0x5a; 16];

/// xorshift64*: a reproducible stream per caller (no crate needed for a test's dice).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs `f`, or drops it after `cancel` (a timeout of zero drops it at its first pause).
async fn maybe_cancelled<F: Future>(cancel: Option<Duration>, f: F) -> Option<F::Output> {
    match cancel {
        Some(d) => tokio::time::timeout(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// A plaintext that names its caller and sequence number, `len` bytes long.
fn tagged(caller: u64, seq: u64, len: usize) -> Zeroizing<Vec<u8>> {
    let tag = format!("caller {caller} seq {seq};");
    Zeroizing::new(tag.bytes().cycle().take(len.max(tag.len())).collect())
}

#[derive(Default)]
struct Tally {
    issued: AtomicU64,
    crossed: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
}

impl Tally {
    fn crossed(&self, what: String) {
        if self.crossed.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("crossed reply: {what}");
        }
    }

    fn error(&self, e: &HsmError) {
        // "unexpected reply" is a reply of another request's type: crossed, not a mere error.
        if e.to_string().contains("unexpected reply") {
            self.crossed(e.to_string());
        } else if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("error: {e}");
        }
    }
}

/// One caller: random lengths of random bytes, and encrypt-then-decrypt of plaintexts naming
/// the caller, some larger than a pipe's buffer (64 KiB) so that a write can be cut midway;
/// a quarter of the calls dropped after 0-2 ms.
async fn caller(pool: TokenPool, id: u64, requests: u64, tally: Arc<Tally>) {
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    let mut seq = 0u64;
    while seq < requests {
        let roll = dice.next();
        let cancel = (roll % 4 == 0).then(|| {
            let micros = (roll >> 8) % 2001;
            // Often exactly zero: dropped at the first point where the call waits.
            Duration::from_micros(if roll & 0x10_0000 == 0 { 0 } else { micros })
        });
        let kind = (roll >> 24) % 256;
        seq += 1;
        tally.issued.fetch_add(1, Ordering::Relaxed);
        if kind < 160 {
            let len = 1 + ((id * 131 + seq) % 300) as usize;
            match maybe_cancelled(cancel, pool.random(len)).await {
                None => {
                    tally.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(r)) if r.len() == len => {}
                Some(Ok(r)) => tally.crossed(format!("{} random bytes for {len}", r.len())),
                Some(Err(e)) => tally.error(&e),
            }
            continue;
        }
        let len = if kind == 255 { 72 * 1024 } else { 64 };
        let plaintext = tagged(id, seq, len);
        let aad = format!("aad {id} {seq}").into_bytes();
        let sealed = match maybe_cancelled(
            cancel,
            pool.encrypt(KEY, aad.clone(), plaintext.clone()),
        )
        .await
        {
            None => {
                tally.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tally.error(&e);
                continue;
            }
        };
        if sealed.ciphertext.len() != plaintext.len() + 16 {
            tally.crossed(format!(
                "{} ciphertext bytes for {} plaintext bytes",
                sealed.ciphertext.len(),
                plaintext.len()
            ));
            continue;
        }
        seq += 1;
        tally.issued.fetch_add(1, Ordering::Relaxed);
        let cancel = (dice.next() % 4 == 0).then_some(Duration::from_micros(dice.next() % 2001));
        match maybe_cancelled(cancel, pool.decrypt(KEY, aad, sealed)).await {
            None => {
                tally.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(back)) if back == plaintext => {}
            Some(Ok(back)) => tally.crossed(format!(
                "caller {id} got {:?}…",
                String::from_utf8_lossy(&back[..back.len().min(24)])
            )),
            // Our own ciphertext under our own AAD does not authenticate: the ciphertext came
            // from someone else's encryption.
            Some(Err(HsmError::InvalidCiphertext)) => {
                tally.crossed(format!("caller {id}: own ciphertext did not authenticate"))
            }
            Some(Err(e)) => tally.error(&e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_never_get_or_cause_crossed_replies() {
    const CALLERS: u64 = 8;
    const REQUESTS: u64 = 100_000;
    let token = TestToken::new(2);
    let pool = token.pool().await;
    pool.generate_key(KEY).await.unwrap();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|id| tokio::spawn(caller(pool.clone(), id, REQUESTS / CALLERS, tally.clone())))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let issued = tally.issued.load(Ordering::Relaxed);
    let crossed = tally.crossed.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let cancelled = tally.cancelled.load(Ordering::Relaxed);
    eprintln!(
        "{issued} requests in {elapsed:.1?}: {cancelled} cancelled, {crossed} crossed, {errors} errors, {} worker restarts",
        pool.restarts()
    );
    assert!(issued >= REQUESTS);
    assert!(cancelled > 1000, "too few cancellations to prove anything");
    assert_eq!(crossed, 0, "replies reached the wrong caller");
    assert_eq!(errors, 0, "requests failed");
    // No worker had to be replaced: a cancelled caller never desynchronises a pipe.
    assert_eq!(pool.restarts(), 0);
    // And the pool still serves.
    let plaintext = Zeroizing::new(b"after the storm".to_vec());
    let sealed = pool.encrypt(KEY, vec![], plaintext.clone()).await.unwrap();
    assert_eq!(pool.decrypt(KEY, vec![], sealed).await.unwrap(), plaintext);
}

/// The real worker behind a proxy that corrupts its `nth` reply (see faulty-worker.pl: a real
/// worker cannot produce these faults).
fn faulty(mode: &str, nth: u32) -> WorkerCommand {
    WorkerCommand {
        program: "perl".into(),
        args: vec![
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/faulty-worker.pl"
            )
            .into(),
            mode.into(),
            nth.to_string().into(),
            env!("CARGO_BIN_EXE_hsm-worker").into(),
        ],
    }
}

async fn corrupt_frame_replaces_the_worker(mode: &str) {
    let token = TestToken::new(1);
    let pool = TokenPool::start(token.config.clone(), faulty(mode, 3))
        .await
        .unwrap();
    for len in 1..=8usize {
        // A corrupt reply is never taken for an answer: the request is replayed on the
        // replacement, whose own third reply is corrupt in turn, and so on.
        let r = pool
            .random(len)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(
            r.len(),
            len,
            "{mode}: a corrupt frame was taken for an answer"
        );
    }
    assert!(
        pool.restarts() >= 2,
        "{mode}: the worker that wrote a corrupt frame must be replaced (restarts: {})",
        pool.restarts()
    );
}

#[tokio::test]
async fn a_reply_with_trailing_bytes_replaces_the_worker() {
    corrupt_frame_replaces_the_worker("trailing").await;
}

#[tokio::test]
async fn a_reply_with_a_wrong_id_replaces_the_worker() {
    corrupt_frame_replaces_the_worker("wrong-id").await;
}

#[tokio::test]
async fn a_garbage_reply_replaces_the_worker() {
    corrupt_frame_replaces_the_worker("garbage").await;
}

#[tokio::test]
async fn a_duplicated_reply_replaces_the_worker() {
    corrupt_frame_replaces_the_worker("duplicate").await;
}

fn signal(pid: i32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A caller dropped while its frame waits for room in a full pipe (the worker paused with
/// SIGSTOP, a real fault) must not leave a waiter without a request: the next reply would go to
/// the wrong caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cancelled_while_the_pipe_is_full_shifts_no_reply() {
    let token = TestToken::new(1);
    let pool = token.pool().await;
    pool.generate_key(KEY).await.unwrap();
    let pids = support::worker_pids(token.dir.path());
    assert_eq!(pids.len(), 1);
    signal(pids[0], "-STOP");
    // An Encrypt frame that leaves (with the framing of the time this test was written) less
    // room in a 64 KiB pipe than the smallest request needs.
    let big = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.encrypt(KEY, vec![], Zeroizing::new(vec![7u8; 65510]))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dropped = tokio::time::timeout(Duration::from_millis(200), pool.random(7)).await;
    assert!(dropped.is_err(), "the worker is paused: no answer expected");
    signal(pids[0], "-CONT");
    let sealed = big.await.unwrap().unwrap();
    assert_eq!(sealed.ciphertext.len(), 65510 + 16);
    let (a, b) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(5), pool.random(8)),
        tokio::time::timeout(Duration::from_secs(5), pool.random(9)),
    );
    assert_eq!(a.expect("no answer").unwrap().len(), 8, "crossed reply");
    assert_eq!(b.expect("no answer").unwrap().len(), 9, "crossed reply");
}
