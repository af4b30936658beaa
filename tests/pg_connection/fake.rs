//! Impostors for the attack tests: a fake PostgreSQL server that asks for
//! the password the way an attacker would and records every byte the
//! client sends after the request, and a TLS relay that terminates TLS with
//! its own certificate and passes the protocol on to a real server.
//!
//! With `relay_sql_to`, the fake server passes connections that are not
//! replication connections to a real server, so that walnats gets as far
//! as its replication connection and that one meets the attack.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SSL_REQUEST: u32 = 80_877_103;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationMD5Password.
    Md5,
    /// SCRAM up to the client's final message, then AuthenticationOk
    /// without the server's final message (the server never proves that
    /// it knows the password).
    ScramOkWithoutServerFinal,
    /// SCRAM with a server final message whose signature is wrong.
    ScramWrongServerSignature,
}

/// One connection that met the attack.
#[derive(Debug, Clone)]
pub struct Attacked {
    /// The startup packet asked for `replication`.
    pub replication: bool,
    /// The SASL mechanism the client chose, for the SCRAM attacks.
    pub mechanism: Option<String>,
    /// Every byte the client sent after the request (for SCRAM: after
    /// the AuthenticationOk), until it closed the connection.
    pub after_request: Vec<u8>,
    /// The client hung up within 5 s (else it was still waiting, as for a
    /// server it believed).
    pub hung_up: bool,
}

pub struct FakePg {
    port: u16,
    attacked: Arc<Mutex<Vec<Attacked>>>,
    task: JoinHandle<()>,
}

impl Drop for FakePg {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS server config with a certificate from a CA nobody trusts.
pub fn self_signed_tls() -> Arc<rustls::ServerConfig> {
    let (_, issuer) = crate::support::test_ca();
    let (cert, key) = crate::support::test_leaf(&issuer, &["localhost", "127.0.0.1"]);
    server_tls(&cert, &key)
}

pub fn server_tls(cert_pem: &str, key_pem: &str) -> Arc<rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    Arc::new(config)
}

impl FakePg {
    /// Listens on 127.0.0.1. `tls`: answer SSLRequest with 'S' and this
    /// certificate, else with 'N'.
    pub async fn start(
        attack: Attack,
        tls: Option<Arc<rustls::ServerConfig>>,
        relay_sql_to: Option<u16>,
    ) -> FakePg {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let attacked = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&attacked);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = serve(tcp, attack, tls, relay_sql_to, record).await;
                });
            }
        });
        FakePg {
            port,
            attacked,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn attacked(&self) -> Vec<Attacked> {
        self.attacked.lock().unwrap().clone()
    }

    /// Waits for the first connection that met the attack and was closed.
    pub async fn first_attacked(&self, timeout: Duration) -> Attacked {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(a) = self.attacked().into_iter().next() {
                return a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no connection met the attack within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A packet without a tag (SSLRequest, startup): its body after the length.
async fn read_untagged<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let len = s.read_u32().await? as usize;
    let mut body = vec![0; len.saturating_sub(4)];
    s.read_exact(&mut body).await?;
    Ok(body)
}

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let tag = s.read_u8().await?;
    let body = read_untagged(s).await?;
    Ok((tag, body))
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    frame(b'R', &body)
}

/// What a server says after AuthenticationOk, up to ReadyForQuery.
fn after_ok() -> Vec<u8> {
    let mut out = auth(0, &[]);
    for (k, v) in [
        ("server_version", "15.0"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("IntervalStyle", "postgres"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        out.extend(frame(b'S', format!("{k}\0{v}\0").as_bytes()));
    }
    out.extend(frame(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    out.extend(frame(b'Z', b"I"));
    out
}

async fn serve(
    mut tcp: TcpStream,
    attack: Attack,
    tls: Option<Arc<rustls::ServerConfig>>,
    relay_sql_to: Option<u16>,
    record: Arc<Mutex<Vec<Attacked>>>,
) -> std::io::Result<()> {
    let first = read_untagged(&mut tcp).await?;
    let code = first
        .get(..4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()));
    let (mut s, startup): (Box<dyn Io>, Vec<u8>) = if code == Some(SSL_REQUEST) {
        match tls {
            Some(config) => {
                tcp.write_all(b"S").await?;
                let mut s = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
                let startup = read_untagged(&mut s).await?;
                (Box::new(s), startup)
            }
            None => {
                tcp.write_all(b"N").await?;
                let startup = read_untagged(&mut tcp).await?;
                (Box::new(tcp), startup)
            }
        }
    } else {
        (Box::new(tcp), first)
    };
    // Protocol version, then name\0value\0 pairs.
    let params: Vec<&[u8]> = startup
        .get(4..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .collect();
    let replication = params
        .chunks(2)
        .any(|kv| kv.first() == Some(&&b"replication"[..]));
    if !replication && let Some(port) = relay_sql_to {
        let mut pg = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut packet = u32::try_from(startup.len() + 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        packet.extend_from_slice(&startup);
        pg.write_all(&packet).await?;
        tokio::io::copy_bidirectional(&mut s, &mut pg).await?;
        return Ok(());
    }
    let mut mechanism = None;
    match attack {
        Attack::Cleartext => s.write_all(&auth(3, &[])).await?,
        Attack::Md5 => s.write_all(&auth(5, &[1, 2, 3, 4])).await?,
        Attack::ScramOkWithoutServerFinal | Attack::ScramWrongServerSignature => {
            s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await?;
            // SASLInitialResponse: mechanism\0, length, client-first.
            let (_, body) = read_frame(&mut s).await?;
            let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
            mechanism = Some(String::from_utf8_lossy(&body[..end]).into_owned());
            let first =
                String::from_utf8_lossy(body.get(end + 5..).unwrap_or_default()).into_owned();
            let nonce = first
                .split(',')
                .find_map(|p| p.strip_prefix("r="))
                .unwrap_or_default()
                .to_owned();
            let server_first = format!("r={nonce}fakeservernonce,s=c2FsdHNhbHRzYWx0,i=4096");
            s.write_all(&auth(11, server_first.as_bytes())).await?;
            let _client_final = read_frame(&mut s).await?;
            if attack == Attack::ScramWrongServerSignature {
                let v = "v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
                s.write_all(&auth(12, v.as_bytes())).await?;
            }
            s.write_all(&after_ok()).await?;
        }
    }
    s.flush().await?;
    // Everything the client says from here until it hangs up.
    let mut after_request = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut hung_up = false;
    while let Ok(read) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
        match read {
            Ok(0) | Err(_) => {
                hung_up = true;
                break;
            }
            Ok(n) => after_request.extend_from_slice(&chunk[..n]),
        }
    }
    record.lock().unwrap().push(Attacked {
        replication,
        mechanism,
        after_request,
        hung_up,
    });
    Ok(())
}

/// The tags of the frontend messages in `bytes` (which start at a message
/// boundary).
pub fn frontend_tags(bytes: &[u8]) -> Vec<char> {
    let mut tags = Vec::new();
    let mut rest = bytes;
    while let (Some(&tag), Some(len)) = (rest.first(), rest.get(1..5)) {
        tags.push(char::from(tag));
        let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
        rest = rest.get(1 + len..).unwrap_or_default();
    }
    tags
}

/// Terminates TLS with its own certificate and opens TLS to the real
/// server (trusting `ca_pem`, name `localhost`), then passes the protocol
/// through, recording what the client sends. It connects to the server
/// from 127.0.0.2 for SQL connections and from 127.0.0.1 for replication
/// connections, so that pg_hba.conf can tell them apart (it matches a
/// logical replication connection by its database, like any other).
pub struct TlsRelay {
    port: u16,
    from_client: Arc<Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsRelay {
    pub async fn start(pg_port: u16, ca_pem: &str) -> TlsRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let server = self_signed_tls();
        let from_client = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&from_client);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (client, server, record) = (
                    Arc::clone(&client),
                    Arc::clone(&server),
                    Arc::clone(&record),
                );
                tokio::spawn(async move {
                    let _ = relay(tcp, pg_port, client, server, record).await;
                });
            }
        });
        TlsRelay {
            port,
            from_client,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything the clients sent inside TLS, all connections together.
    pub fn sent_by_clients(&self) -> Vec<u8> {
        self.from_client.lock().unwrap().clone()
    }
}

async fn relay(
    mut tcp: TcpStream,
    pg_port: u16,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    record: Arc<Mutex<Vec<u8>>>,
) -> std::io::Result<()> {
    let first = read_untagged(&mut tcp).await?;
    assert_eq!(
        first,
        SSL_REQUEST.to_be_bytes(),
        "the client did not ask for TLS"
    );
    tcp.write_all(b"S").await?;
    let mut from_walnats = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await?;
    let startup = read_untagged(&mut from_walnats).await?;
    let replication = startup
        .get(4..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .any(|p| p == b"replication");
    let from: std::net::SocketAddr = if replication {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "127.0.0.2:0".parse().unwrap()
    };
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(from)?;
    let mut pg = socket.connect(([127, 0, 0, 1], pg_port).into()).await?;
    pg.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    assert_eq!(pg.read_u8().await?, b'S', "PostgreSQL has no TLS");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut to_pg = tokio_rustls::TlsConnector::from(client)
        .connect(name, pg)
        .await?;
    let mut packet = u32::try_from(startup.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    packet.extend_from_slice(&startup);
    record.lock().unwrap().extend_from_slice(&packet);
    to_pg.write_all(&packet).await?;
    let (mut wr, mut ww) = tokio::io::split(from_walnats);
    let (mut pr, mut pw) = tokio::io::split(to_pg);
    let up = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = wr.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            record.lock().unwrap().extend_from_slice(&chunk[..n]);
            pw.write_all(&chunk[..n]).await?;
        }
        pw.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut pr, &mut ww).await?;
        ww.shutdown().await
    };
    let _ = tokio::join!(up, down);
    Ok(())
}
