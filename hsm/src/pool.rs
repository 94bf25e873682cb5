//! A pool of worker processes serving one token.
//!
//! Requests go into one queue; each of the `k` workers takes the next request when it is free.
//! A worker that dies (EOF on its pipe) or whose session breaks is replaced, and the request is
//! replayed once on the replacement where [`Request::retry_is_safe`]. When no replacement can log
//! in, the token is reported unavailable so that a [`crate::Cluster`] can fail over.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, Mutex};
use zeroize::Zeroizing;

use crate::error::HsmError;
use crate::proto::{
    decode_body, encode_frame, Hello, KeyIdBytes, Reply, Request, Response, Sealed, TokenInfo,
    MAX_FRAME,
};

/// How to start a worker process: a program and its arguments (e.g. `hsmkms worker`).
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// One token and how to reach it.
#[derive(Clone)]
pub struct TokenConfig {
    /// The PKCS#11 module (shared library) path.
    pub module: PathBuf,
    /// The token's label (`CKA_LABEL` of the token, as `C_GetTokenInfo` reports it).
    pub label: String,
    /// The user PIN.
    pub pin: SecretString,
    /// Worker processes for this token.
    pub workers: usize,
    /// Extra environment for the workers (e.g. `SOFTHSM2_CONF`).
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("module", &self.module)
            .field("label", &self.label)
            .field("pin", &"[redacted]")
            .field("workers", &self.workers)
            .finish()
    }
}

/// Don't hammer a token that refuses logins: after a failed start, wait this long before trying again.
const RESPAWN_BACKOFF: Duration = Duration::from_millis(500);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Reply, HsmError>>,
}

struct Shared {
    config: TokenConfig,
    command: WorkerCommand,
    info: TokenInfo,
    up: AtomicBool,
    restarts: AtomicU64,
    last_spawn_failure: StdMutex<Option<(Instant, String)>>,
}

/// The workers of one token. Cheap to clone; the workers stop when the last clone is dropped.
#[derive(Clone)]
pub struct TokenPool {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Job>,
}

impl TokenPool {
    /// Starts the pool; fails if the first worker cannot load the module, find the token or log in.
    pub async fn start(config: TokenConfig, command: WorkerCommand) -> Result<TokenPool, HsmError> {
        let first = WorkerProcess::spawn(&config, &command).await?;
        let workers = config.workers.max(1);
        let shared = Arc::new(Shared {
            info: first.info.clone(),
            config,
            command,
            up: AtomicBool::new(true),
            restarts: AtomicU64::new(0),
            last_spawn_failure: StdMutex::new(None),
        });
        let (tx, rx) = mpsc::channel::<Job>(1024);
        let rx = Arc::new(Mutex::new(rx));
        let mut first = Some(first);
        for _ in 0..workers {
            let worker = WorkerSlot {
                shared: shared.clone(),
                process: first.take(),
            };
            tokio::spawn(worker.serve(rx.clone()));
        }
        Ok(TokenPool { shared, queue: tx })
    }

    pub fn label(&self) -> &str {
        &self.shared.config.label
    }

    pub fn info(&self) -> &TokenInfo {
        &self.shared.info
    }

    /// False after a worker could not be restarted; true again once one is.
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// Worker processes replaced since start.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_spawn_failure
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, e)| e.clone())
    }

    pub async fn call(&self, request: Request) -> Result<Reply, HsmError> {
        let (tx, rx) = oneshot::channel();
        let unavailable = || HsmError::TokenUnavailable {
            token: self.label().to_string(),
            reason: "worker pool stopped".into(),
        };
        self.queue
            .send(Job { request, reply: tx })
            .await
            .map_err(|_| unavailable())?;
        rx.await.map_err(|_| unavailable())?
    }

    fn unexpected(&self, reply: Reply) -> HsmError {
        HsmError::Other {
            token: self.label().to_string(),
            message: format!("unexpected reply {reply:?}"),
        }
    }

    pub async fn generate_key(&self, key_id: KeyIdBytes) -> Result<(), HsmError> {
        match self.call(Request::GenerateKey { key_id }).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn has_key(&self, key_id: KeyIdBytes) -> Result<bool, HsmError> {
        match self.call(Request::HasKey { key_id }).await? {
            Reply::Exists(b) => Ok(b),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyIdBytes>, HsmError> {
        match self.call(Request::ListKeys).await? {
            Reply::KeyIds(ids) => Ok(ids),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn destroy_key(&self, key_id: KeyIdBytes) -> Result<(), HsmError> {
        match self.call(Request::DestroyKey { key_id }).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn encrypt(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<Sealed, HsmError> {
        match self
            .call(Request::Encrypt {
                key_id,
                aad,
                plaintext,
            })
            .await?
        {
            Reply::Sealed(s) => Ok(s),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn decrypt(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        sealed: Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        match self
            .call(Request::Decrypt {
                key_id,
                aad,
                sealed,
            })
            .await?
        {
            Reply::Plaintext(p) => Ok(p),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn generate_data_key(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        len: usize,
    ) -> Result<(Zeroizing<Vec<u8>>, Sealed), HsmError> {
        match self
            .call(Request::GenerateDataKey { key_id, aad, len })
            .await?
        {
            Reply::DataKey { plaintext, sealed } => Ok((plaintext, sealed)),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn random(&self, len: usize) -> Result<Vec<u8>, HsmError> {
        match self.call(Request::Random { len }).await? {
            Reply::Random(r) => Ok(r),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn ping(&self) -> Result<(), HsmError> {
        match self.call(Request::Ping).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }
}

/// One worker's place in the pool: the process serving it now, if any.
struct WorkerSlot {
    shared: Arc<Shared>,
    process: Option<WorkerProcess>,
}

impl WorkerSlot {
    async fn serve(mut self, queue: Arc<Mutex<mpsc::Receiver<Job>>>) {
        loop {
            let job = { queue.lock().await.recv().await };
            let Some(job) = job else { return };
            let result = self.run(&job.request).await;
            let _ = job.reply.send(result);
        }
    }

    async fn run(&mut self, request: &Request) -> Result<Reply, HsmError> {
        let token = self.shared.config.label.clone();
        let attempts = if request.retry_is_safe() { 2 } else { 1 };
        let mut last_error = None;
        for _ in 0..attempts {
            let process = match self.process.as_mut() {
                Some(p) => p,
                None => {
                    let p = self.respawn().await?;
                    self.process.insert(p)
                }
            };
            match process.call(request).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(failure)) => {
                    let broken = failure.kind == crate::proto::FailureKind::SessionBroken;
                    let error = HsmError::from_failure(&token, failure);
                    if !broken {
                        return Err(error);
                    }
                    tracing::warn!(token = %token, op = request.name(), error = %error, "session broken; replacing worker");
                    last_error = Some(error);
                }
                Err(io) => {
                    tracing::warn!(token = %token, op = request.name(), error = %io, "worker died; replacing it");
                    last_error = Some(HsmError::TokenUnavailable {
                        token: token.clone(),
                        reason: format!("worker died: {io}"),
                    });
                }
            }
            if let Some(p) = self.process.take() {
                p.kill().await;
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    async fn respawn(&mut self) -> Result<WorkerProcess, HsmError> {
        let token = self.shared.config.label.clone();
        if let Some((at, reason)) = self.shared.last_spawn_failure.lock().unwrap().clone() {
            if at.elapsed() < RESPAWN_BACKOFF && !self.shared.up.load(Ordering::Relaxed) {
                return Err(HsmError::TokenUnavailable { token, reason });
            }
        }
        match WorkerProcess::spawn(&self.shared.config, &self.shared.command).await {
            Ok(p) => {
                self.shared.restarts.fetch_add(1, Ordering::Relaxed);
                if !self.shared.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(token = %token, "token is back");
                }
                *self.shared.last_spawn_failure.lock().unwrap() = None;
                Ok(p)
            }
            Err(e) => {
                if self.shared.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(token = %token, error = %e, "token is down");
                }
                *self.shared.last_spawn_failure.lock().unwrap() =
                    Some((Instant::now(), e.to_string()));
                Err(match e {
                    e @ HsmError::TokenUnavailable { .. } => e,
                    other => HsmError::TokenUnavailable {
                        token,
                        reason: other.to_string(),
                    },
                })
            }
        }
    }
}

struct WorkerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    info: TokenInfo,
}

impl WorkerProcess {
    async fn spawn(
        config: &TokenConfig,
        command: &WorkerCommand,
    ) -> Result<WorkerProcess, HsmError> {
        let token = config.label.clone();
        let down = |reason: String| HsmError::TokenUnavailable {
            token: token.clone(),
            reason,
        };
        let mut cmd = Command::new(&command.program);
        cmd.args(&command.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            down(format!(
                "cannot start worker {}: {e}",
                command.program.display()
            ))
        })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut process = WorkerProcess {
            child,
            stdin,
            stdout,
            info: TokenInfo {
                label: token.clone(),
                manufacturer: String::new(),
                model: String::new(),
                serial: String::new(),
            },
        };
        let hello = Hello {
            module: config.module.to_string_lossy().into_owned(),
            token_label: config.label.clone(),
            pin: config.pin.clone(),
        };
        let frame = encode_frame(&hello).map_err(|e| down(e.to_string()))?;
        let handshake = async {
            process.stdin.write_all(&frame).await?;
            process.read_response().await
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(Ok(Reply::Ready(info)))) => {
                process.info = info;
                Ok(process)
            }
            Ok(Ok(Ok(other))) => Err(down(format!("unexpected handshake reply {other:?}"))),
            Ok(Ok(Err(failure))) => {
                process.kill().await;
                Err(HsmError::from_failure(&token, failure))
            }
            Ok(Err(io)) => {
                process.kill().await;
                Err(down(format!("worker exited during start: {io}")))
            }
            Err(_) => {
                process.kill().await;
                Err(down("worker did not answer within 30 s".into()))
            }
        }
    }

    async fn call(&mut self, request: &Request) -> std::io::Result<Response> {
        let frame = encode_frame(request)?;
        self.stdin.write_all(&frame).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> std::io::Result<Response> {
        let len = self.stdout.read_u32_le().await? as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        let mut body = Zeroizing::new(vec![0u8; len]);
        self.stdout.read_exact(&mut body).await?;
        decode_body(&body)
    }

    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
