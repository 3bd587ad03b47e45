//! One kept-alive HTTP/1.1 connection to a destination, owned by the sender's worker for that
//! destination: a `/send` is one write (head and body together) and a read or two, all in the
//! worker's own task. reqwest's pooled client hands each request, and then its answer, between
//! the worker's task and a connection task; with 1,000 destinations those hand-offs and their
//! wake-ups were a large part of the fan-out's CPU (BENCHMARKS.md, issue #13).
//!
//! Everything else is the federation client's: where to connect ([`FederationClient::connect_target`]:
//! server-name resolution with the address policy, or an operator override), the TLS
//! configuration and certificate verifier, the connect and request timeouts, the answer size
//! limit, redirects refused, and the X-Matrix signature.

use std::sync::Arc;
use std::time::Duration;

use ruma::OwnedServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::{transport, ConnectTarget, FederationClient, FederationError, USER_AGENT};

/// Most bytes of an answer's status line and headers.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers in an answer.
const MAX_HEADERS: usize = 64;

trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Transport for T {}

/// An open connection and what requests on it need.
struct Open {
    stream: Box<dyn Transport>,
    host_header: String,
    path_prefix: String,
    /// Bytes read and not yet consumed: past the last answer, a well-behaved server sends none.
    /// Kept with its capacity, like `request`, so that an exchange allocates no buffers (with
    /// a thousand destinations per event, those were a good part of the sender's allocations).
    buffer: Vec<u8>,
    /// The request being sent.
    request: Vec<u8>,
}

/// The sender's connection to one destination. Connects on first use and again after any
/// failure; a request that is abandoned half-way (shutdown, lost lease) drops the connection.
pub struct DestinationConnection {
    client: Arc<FederationClient>,
    destination: OwnedServerName,
    open: Option<Open>,
}

/// An answer read off the connection.
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// The server keeps the connection open for the next request.
    keep_alive: bool,
}

impl DestinationConnection {
    pub fn new(client: Arc<FederationClient>, destination: OwnedServerName) -> DestinationConnection {
        DestinationConnection { client, destination, open: None }
    }

    /// Sends a signed `PUT` of `body` (canonical JSON text, so it is also what is signed) and
    /// returns the JSON object of a 2xx answer; any other status is [`FederationError::Status`].
    pub async fn put(&mut self, path: &str, body: &[u8]) -> Result<Value, FederationError> {
        let content = std::str::from_utf8(body).map_err(|e| FederationError::BadBody(e.to_string()))?;
        let authorization = self.client.authorization(self.destination.as_str(), "PUT", path, Some(content));
        self.put_authorized(path, body, &authorization).await
    }

    /// [`DestinationConnection::put`] with the `Authorization` header already made (one body's
    /// headers for many destinations are made together, see `xmatrix::SharedBodyAuthorization`).
    pub async fn put_authorized(
        &mut self,
        path: &str,
        body: &[u8],
        authorization: &str,
    ) -> Result<Value, FederationError> {
        let server = self.destination.as_str().to_owned();
        let timeout = self.client.request_timeout;
        let exchange = async {
            // A kept-alive connection the server closed meanwhile fails before any answer: that
            // request is sent once more on a new connection (`/send` is idempotent by its ID).
            let reused = self.open.is_some();
            match self.exchange(path, authorization, body).await {
                Err(ExchangeError::Unanswered(_)) if reused => self.exchange(path, authorization, body).await,
                other => other,
            }
        };
        let answer = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => return Err(error.into_federation(&server, self.client.max_response_bytes)),
            Err(_) => {
                self.open = None;
                return Err(transport(&server, format!("no answer within {} ms", timeout.as_millis())));
            }
        };
        interpret(&server, answer, self.client.max_response_bytes)
    }

    /// One request and its answer. The connection is taken out for the exchange and put back
    /// only when the answer was read whole and the server keeps it open.
    async fn exchange(&mut self, path: &str, authorization: &str, body: &[u8]) -> Result<Answer, ExchangeError> {
        let mut open = match self.open.take() {
            Some(open) => open,
            None => self.connect().await.map_err(ExchangeError::Connect)?,
        };
        write_request(&mut open, path, authorization, body);
        send_request(&mut open, body).await.map_err(|e| ExchangeError::Unanswered(e.to_string()))?;
        let answer = read_answer(&mut open, self.client.max_response_bytes).await?;
        if answer.keep_alive {
            self.open = Some(open);
        }
        Ok(answer)
    }

    async fn connect(&self) -> Result<Open, FederationError> {
        let server = self.destination.as_str();
        let ConnectTarget { addrs, tls, host_header, path_prefix } =
            self.client.connect_target(&self.destination).await?;
        let tcp = connect_any(server, &addrs, self.client.connect_timeout).await?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Transport> = match tls {
            None => Box::new(tcp),
            Some(name) => {
                let name = rustls::pki_types::ServerName::try_from(name).map_err(|e| transport(server, e))?;
                let connector = tokio_rustls::TlsConnector::from(self.client.http1_tls.clone());
                let handshake = connector.connect(name, tcp);
                let tls = tokio::time::timeout(self.client.connect_timeout, handshake)
                    .await
                    .map_err(|_| transport(server, "TLS handshake timed out"))?
                    .map_err(|e| transport(server, e))?;
                Box::new(tls)
            }
        };
        Ok(Open { stream, host_header, path_prefix, buffer: Vec::new(), request: Vec::new() })
    }
}

/// The first address that accepts a connection within the connect timeout.
async fn connect_any(
    server: &str,
    addrs: &[std::net::SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, FederationError> {
    let mut last = format!("no address for {server}");
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connect timed out"),
        }
    }
    Err(transport(server, last))
}

/// Lays out the request head in `open.request`, and the body after it where the stream cannot
/// take the two parts in one vectored write (TLS).
fn write_request(open: &mut Open, path: &str, authorization: &str, body: &[u8]) {
    use std::io::Write;
    let request = &mut open.request;
    request.clear();
    write!(
        request,
        "PUT {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {USER_AGENT}\r\nAuthorization: {authorization}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        open.path_prefix,
        open.host_header,
        body.len()
    )
    .expect("writing to a Vec cannot fail");
    if !open.stream.is_write_vectored() {
        request.extend_from_slice(body);
    }
}

/// Sends what [`write_request`] laid out. On plain TCP the head and the body go out together
/// in one `writev`, so the body (30 KB for a busy room's transaction, sent to every
/// destination) is not copied once per destination first.
async fn send_request(open: &mut Open, body: &[u8]) -> std::io::Result<()> {
    if !open.stream.is_write_vectored() {
        return open.stream.write_all(&open.request).await;
    }
    let (mut head, mut body) = (&open.request[..], body);
    while !head.is_empty() || !body.is_empty() {
        let parts = [std::io::IoSlice::new(head), std::io::IoSlice::new(body)];
        let written = open.stream.write_vectored(&parts).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = written.min(head.len());
        head = &head[from_head..];
        body = &body[written - from_head..];
    }
    Ok(())
}

enum ExchangeError {
    /// Nothing of an answer arrived (the request may not have reached the server).
    Unanswered(String),
    /// The answer broke off or was malformed.
    Broken(String),
    /// The answer body is over the limit.
    TooLarge,
    Connect(FederationError),
}

impl ExchangeError {
    fn into_federation(self, server: &str, limit: usize) -> FederationError {
        match self {
            ExchangeError::Unanswered(reason) | ExchangeError::Broken(reason) => transport(server, reason),
            ExchangeError::TooLarge => FederationError::TooLarge { server: server.to_owned(), limit },
            ExchangeError::Connect(error) => error,
        }
    }
}

fn broken(reason: impl std::fmt::Display) -> ExchangeError {
    ExchangeError::Broken(reason.to_string())
}

/// Reads one answer: the head (skipping `1xx` interim answers), then a body framed by
/// `Content-Length`, chunked encoding, or the end of the connection.
async fn read_answer(open: &mut Open, limit: usize) -> Result<Answer, ExchangeError> {
    let mut buffer = std::mem::take(&mut open.buffer);
    loop {
        let (head_len, status, framing, keep_alive) = loop {
            if let Some(parsed) = parse_head(&buffer).map_err(broken)? {
                break parsed;
            }
            if buffer.len() > MAX_HEAD_BYTES {
                return Err(broken("answer head too large"));
            }
            match read_more(&mut open.stream, &mut buffer).await {
                Ok(0) | Err(_) if buffer.is_empty() => {
                    return Err(ExchangeError::Unanswered("connection closed before an answer".into()))
                }
                Ok(0) => return Err(broken("connection closed in the answer head")),
                Ok(_) => {}
                Err(e) => return Err(broken(e)),
            }
        };
        buffer.drain(..head_len);
        if (100..200).contains(&status) {
            continue;
        }
        let (body, keep_alive) = match framing {
            Framing::Length(length) => {
                if length > limit {
                    return Err(ExchangeError::TooLarge);
                }
                while buffer.len() < length {
                    if read_more(&mut open.stream, &mut buffer).await.map_err(broken)? == 0 {
                        return Err(broken("connection closed in the answer body"));
                    }
                }
                let body = buffer[..length].to_vec();
                buffer.drain(..length);
                open.buffer = buffer;
                (body, keep_alive)
            }
            // Rare for these answers: the connection is not reused after one (no trailer parsing).
            Framing::Chunked => (read_chunked(&mut open.stream, buffer, limit).await?, false),
            Framing::UntilClose => {
                while read_more(&mut open.stream, &mut buffer).await.map_err(broken)? > 0 {
                    if buffer.len() > limit {
                        return Err(ExchangeError::TooLarge);
                    }
                }
                (buffer, false)
            }
        };
        return Ok(Answer { status, body, keep_alive });
    }
}

/// Reads what is there into the buffer's spare room (no zeroed scratch buffer, no copy).
async fn read_more(stream: &mut Box<dyn Transport>, buffer: &mut Vec<u8>) -> std::io::Result<usize> {
    buffer.reserve(4 * 1024);
    stream.read_buf(buffer).await
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// The answer head, once complete: its length, the status, how the body is framed and whether
/// the connection stays open.
type Head = (usize, u16, Framing, bool);

fn parse_head(buffer: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buffer).map_err(|e| format!("bad answer head: {e}"))? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.unwrap_or(0);
    let mut keep_alive = response.version == Some(1);
    let mut framing = Framing::UntilClose;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = value.parse::<usize>().map_err(|_| "bad Content-Length".to_owned())?;
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(length);
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().ends_with("chunked") {
                framing = Framing::Chunked;
            }
        } else if header.name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            keep_alive = if keep_alive { !value.contains("close") } else { value.contains("keep-alive") };
        }
    }
    // Answers that never have a body (RFC 9112 section 6.3).
    if status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    if matches!(framing, Framing::UntilClose) {
        keep_alive = false;
    }
    Ok(Some((head_len, status, framing, keep_alive)))
}

/// Decodes a chunked body up to its last (empty) chunk.
async fn read_chunked(
    stream: &mut Box<dyn Transport>,
    mut buffer: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, ExchangeError> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(at) = buffer.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            if buffer.len() > MAX_HEAD_BYTES {
                return Err(broken("chunk size line too long"));
            }
            if read_more(stream, &mut buffer).await.map_err(broken)? == 0 {
                return Err(broken("connection closed in a chunked body"));
            }
        };
        let line = std::str::from_utf8(&buffer[..line_end]).map_err(|_| broken("bad chunk size"))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| broken("bad chunk size"))?;
        buffer.drain(..line_end + 2);
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > limit {
            return Err(ExchangeError::TooLarge);
        }
        while buffer.len() < size + 2 {
            if read_more(stream, &mut buffer).await.map_err(broken)? == 0 {
                return Err(broken("connection closed in a chunk"));
            }
        }
        body.extend_from_slice(&buffer[..size]);
        buffer.drain(..size + 2);
    }
}

/// The answer as the federation client would report it: a 2xx JSON object, a refused redirect,
/// or the remote error with its `errcode`.
fn interpret(server: &str, answer: Answer, limit: usize) -> Result<Value, FederationError> {
    if (300..400).contains(&answer.status) {
        return Err(transport(server, format!("answered {} (a redirect, which is not followed)", answer.status)));
    }
    if answer.body.len() > limit {
        return Err(FederationError::TooLarge { server: server.to_owned(), limit });
    }
    let body = match serde_json::from_slice::<Value>(&answer.body) {
        Ok(value) if value.is_object() => value,
        _ => return Err(FederationError::NotJson { server: server.to_owned() }),
    };
    if (200..300).contains(&answer.status) {
        Ok(body)
    } else {
        let errcode = body.get("errcode").and_then(Value::as_str).unwrap_or("").to_owned();
        Err(FederationError::Status { server: server.to_owned(), status: answer.status, errcode, body })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::net::TcpListener;

    use super::*;
    use crate::keys::SigningKey;

    const SERVER: &str = "peer.test";

    /// A raw HTTP/1.1 server on 127.0.0.1: connection `i` answers its requests with
    /// `script[i]`, in order, then closes. Records every request head and body.
    /// (connection index, request head, request body)
    type Seen = Arc<Mutex<Vec<(usize, String, Vec<u8>)>>>;

    struct Scripted {
        port: u16,
        requests: Seen,
    }

    async fn scripted(script: Vec<Vec<&'static str>>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Seen = Arc::default();
        let seen = requests.clone();
        tokio::spawn(async move {
            for (index, answers) in script.into_iter().enumerate() {
                let (mut socket, _) = listener.accept().await.unwrap();
                for answer in answers {
                    let Some((head, body)) = read_request(&mut socket).await else { break };
                    seen.lock().unwrap().push((index, head, body));
                    socket.write_all(answer.as_bytes()).await.unwrap();
                }
            }
        });
        Scripted { port, requests }
    }

    async fn read_request(socket: &mut TcpStream) -> Option<(String, Vec<u8>)> {
        let mut buffer = Vec::new();
        loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buffer[..end].to_vec()).unwrap();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .map(|v| v.parse().unwrap())
                    .unwrap_or(0);
                while buffer.len() < end + 4 + length {
                    let mut chunk = [0u8; 4096];
                    let n = socket.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                }
                return Some((head, buffer[end + 4..end + 4 + length].to_vec()));
            }
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn connection(port: u16, max_response_bytes: usize) -> DestinationConnection {
        crate::app::install_crypto_provider();
        let mut config = crate::config::Config { server_name: "us.test".into(), ..Default::default() };
        config.federation.destinations.insert(SERVER.into(), format!("http://127.0.0.1:{port}"));
        config.federation.max_response_bytes = max_response_bytes;
        let settings = config.validate().unwrap();
        let dns = Arc::new(crate::federation::resolve::HickoryDns::from_system());
        let client = FederationClient::new(&settings, Arc::new(SigningKey::generate()), dns).unwrap();
        DestinationConnection::new(Arc::new(client), OwnedServerName::try_from(SERVER).unwrap())
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"pdus\":{}}";

    #[tokio::test]
    async fn requests_share_one_connection_and_are_signed_for_the_destination() {
        let server = scripted(vec![vec![OK, OK]]).await;
        let mut connection = connection(server.port, 1024);
        let body = br#"{"edus":[],"origin":"us.test","pdus":[]}"#;
        for txn in ["t1", "t2"] {
            let answer = connection.put(&format!("/_matrix/federation/v1/send/{txn}"), body).await.unwrap();
            assert_eq!(answer, serde_json::json!({ "pdus": {} }));
        }
        let requests = server.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2);
        assert!(requests.iter().all(|(conn, _, _)| *conn == 0), "one connection for both");
        let (_, head, sent) = &requests[1];
        assert!(head.starts_with("PUT /_matrix/federation/v1/send/t2 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nHost: peer.test\r\n"), "{head}");
        assert!(head.contains("X-Matrix origin=\"us.test\",destination=\"peer.test\""), "{head}");
        assert_eq!(sent, body);
    }

    /// A body far larger than the socket's send buffer goes out in several partial vectored
    /// writes; the server gets the head once and every byte of the body in order.
    #[tokio::test]
    async fn a_body_larger_than_the_socket_buffer_arrives_whole() {
        let server = scripted(vec![vec![OK]]).await;
        let mut connection = connection(server.port, 1024);
        let pattern: Vec<u8> = (0..8 * 1024 * 1024).map(|i: u32| b'a' + (i % 7 + i / 4093 % 13) as u8).collect();
        let body = [b"{\"x\":\"".as_slice(), &pattern, b"\"}"].concat();
        connection.put("/big", &body).await.unwrap();
        let requests = server.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 1);
        let (_, head, sent) = &requests[0];
        assert!(head.starts_with("PUT /big HTTP/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())), "{head}");
        assert!(*sent == body, "the body arrived changed ({} bytes of {})", sent.len(), body.len());
    }

    /// A kept-alive connection the server closed is replaced, and the request sent again.
    #[tokio::test]
    async fn a_closed_kept_alive_connection_is_replaced() {
        let server = scripted(vec![vec![OK], vec![OK]]).await;
        let mut connection = connection(server.port, 1024);
        connection.put("/a", b"{}").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        connection.put("/b", b"{}").await.unwrap();
        let connections: Vec<usize> = server.requests.lock().unwrap().iter().map(|(c, _, _)| *c).collect();
        assert_eq!(connections, [0, 1]);
    }

    #[tokio::test]
    async fn interim_and_chunked_answers_are_read() {
        let answer = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      4\r\n{\"pd\r\n7;ext=1\r\nus\":{}}\r\n0\r\n\r\n";
        let server = scripted(vec![vec![answer]]).await;
        let answer = connection(server.port, 1024).put("/a", b"{}").await.unwrap();
        assert_eq!(answer, serde_json::json!({ "pdus": {} }));
    }

    #[tokio::test]
    async fn errors_redirects_and_oversized_answers_are_refused() {
        let forbidden =
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 42\r\n\r\n{\"errcode\":\"M_FORBIDDEN\",\"error\":\"no ACL\"}";
        let redirect = "HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n";
        let large = "HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n";
        let server = scripted(vec![vec![forbidden, redirect, large]]).await;
        let mut connection = connection(server.port, 1024);
        match connection.put("/a", b"{}").await {
            Err(FederationError::Status { status: 403, errcode, .. }) => assert_eq!(errcode, "M_FORBIDDEN"),
            other => panic!("{other:?}"),
        }
        let redirected = connection.put("/b", b"{}").await;
        assert!(
            matches!(&redirected, Err(FederationError::Transport { reason, .. }) if reason.contains("redirect")),
            "{redirected:?}"
        );
        let oversized = connection.put("/c", b"{}").await;
        assert!(matches!(oversized, Err(FederationError::TooLarge { limit: 1024, .. })), "{oversized:?}");
    }
}
