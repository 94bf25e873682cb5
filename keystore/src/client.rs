//! A small signed KMS JSON client over one keep-alive HTTP/1.1 connection.
//!
//! For the load tool and the Rust tests, which must measure and drive the service without an
//! SDK's overhead. Users' clients are the AWS CLI and SDKs.

use std::time::SystemTime;

use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::sigv4::{format_amz_date, SignedRequest, Signer};

/// A connection: plain TCP or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct KmsClient {
    addr: String,
    signer: Signer,
    tls: Option<tokio_rustls::TlsConnector>,
    conn: Option<BufReader<Box<dyn Stream>>>,
}

/// What the service answered: the HTTP status and the JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Answer {
    /// The KMS exception name of an error answer.
    pub fn error_code(&self) -> Option<&str> {
        self.body.get("__type").and_then(|v| v.as_str())
    }
}

impl KmsClient {
    /// `addr` is `host:port`.
    pub fn new(addr: &str, access_key_id: &str, secret: SecretString, region: &str) -> KmsClient {
        KmsClient {
            addr: addr.to_string(),
            signer: Signer::new(access_key_id, secret, region, "kms"),
            tls: None,
            conn: None,
        }
    }

    /// Speaks HTTPS, checking the service's certificate with `tls`.
    pub fn with_tls(mut self, tls: tokio_rustls::TlsConnector) -> KmsClient {
        self.tls = Some(tls);
        self
    }

    /// Calls `TrentService.<operation>`; reconnects once if a kept-alive connection was closed.
    pub async fn call(
        &mut self,
        operation: &str,
        body: &serde_json::Value,
    ) -> std::io::Result<Answer> {
        let (status, body) = self.call_raw(operation, &serde_json::to_vec(body)?).await?;
        let body = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body)?
        };
        Ok(Answer { status, body })
    }

    /// Like [`KmsClient::call`] with the body already serialised and the answer's body left
    /// unparsed: what a load generator needs, at the least cost to the machine it shares.
    pub async fn call_raw(
        &mut self,
        operation: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let request = self.signed_request(operation, body)?;
        let reused = self.conn.is_some();
        match self.exchange(&request).await {
            Ok(a) => Ok(a),
            Err(_) if reused => {
                self.conn = None;
                self.exchange(&request).await
            }
            Err(e) => Err(e),
        }
    }

    fn signed_request(&mut self, operation: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut headers = HeaderMap::new();
        let invalid =
            |e: axum::http::header::InvalidHeaderValue| std::io::Error::other(e.to_string());
        headers.insert("host", HeaderValue::from_str(&self.addr).map_err(invalid)?);
        headers.insert(
            "x-amz-date",
            HeaderValue::from_str(&format_amz_date(SystemTime::now())).map_err(invalid)?,
        );
        headers.insert(
            "x-amz-target",
            HeaderValue::from_str(&format!("TrentService.{operation}")).map_err(invalid)?,
        );
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/x-amz-json-1.1"),
        );
        let uri: Uri = "/".parse().expect("valid URI");
        let request = SignedRequest {
            method: &Method::POST,
            uri: &uri,
            headers: &headers,
            body,
        };
        let authorization = self
            .signer
            .sign(&request)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut out = Vec::with_capacity(512 + body.len());
        out.extend_from_slice(b"POST / HTTP/1.1\r\n");
        for (name, value) in &headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            format!(
                "authorization: {authorization}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body);
        Ok(out)
    }

    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            let stream: Box<dyn Stream> = match &self.tls {
                None => Box::new(stream),
                Some(tls) => {
                    let host = self
                        .addr
                        .rsplit_once(':')
                        .map_or(self.addr.as_str(), |(h, _)| h)
                        .trim_start_matches('[')
                        .trim_end_matches(']');
                    let name = rustls::pki_types::ServerName::try_from(host.to_string())
                        .map_err(|e| std::io::Error::other(format!("{host}: {e}")))?;
                    Box::new(tls.connect(name, stream).await?)
                }
            };
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().expect("connected");
        conn.get_mut().write_all(request).await?;
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut length = 0usize;
        loop {
            line.clear();
            conn.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value
                        .trim()
                        .parse()
                        .map_err(|_| std::io::Error::other("bad content-length"))?;
                }
            }
        }
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).await?;
        Ok((status, body))
    }
}
