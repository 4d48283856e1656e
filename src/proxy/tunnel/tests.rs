//! The handshake against a tiny proxy written here: a TCP listener that reads the
//! request's head and answers what each test scripts.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;

/// What the fake proxy does once it has read the request's head.
enum Answer {
    /// Writes these bytes, then keeps the connection open until the client is done.
    Bytes(Vec<u8>),
    /// Writes these bytes and closes.
    BytesThenClose(Vec<u8>),
    /// Writes nothing, keeps the connection open.
    Silence,
}

/// A one-connection proxy on 127.0.0.1; the request head it read comes back through the
/// receiver, and after the head it echoes back one line of tunnel traffic (to show that
/// the stream handed back is the tunnel).
async fn fake_proxy(answer: Answer) -> (Proxy, oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let _ = tx.send(String::from_utf8(head).unwrap());
        match answer {
            Answer::Bytes(bytes) => {
                socket.write_all(&bytes).await.unwrap();
                let mut rest = vec![0u8; 64];
                if let Ok(n) = socket.read(&mut rest).await {
                    let _ = socket.write_all(&rest[..n]).await;
                }
                let mut sink = Vec::new();
                let _ = socket.read_to_end(&mut sink).await;
            }
            Answer::BytesThenClose(bytes) => {
                let _ = socket.write_all(&bytes).await;
            }
            Answer::Silence => {
                let mut sink = Vec::new();
                let _ = socket.read_to_end(&mut sink).await;
            }
        }
    });
    let proxy = Proxy {
        host: "127.0.0.1".into(),
        port,
        authorization: None,
    };
    (proxy, rx)
}

async fn tunnel(proxy: &Proxy) -> Result<TcpStream, TunnelError> {
    open(
        proxy,
        "api.push.apple.com",
        443,
        Duration::from_secs(5),
        |_| Ok(()),
    )
    .await
}

#[tokio::test]
async fn a_2xx_opens_the_tunnel_and_leaves_what_follows_in_the_stream() {
    // The proxy's answer and the tunnel's first bytes arrive in one write.
    let (mut proxy, request) = fake_proxy(Answer::Bytes(
        b"HTTP/1.0 200 Connection established\r\nProxy-agent: fake\r\n\r\nFIRST".to_vec(),
    ))
    .await;
    proxy.authorization = Some(crate::secret::Secret::new("Basic dTpw".into()));
    let mut stream = tunnel(&proxy).await.unwrap();
    let request = request.await.unwrap();
    assert!(
        request.starts_with("CONNECT api.push.apple.com:443 HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.contains("\r\nHost: api.push.apple.com:443\r\n"),
        "{request}"
    );
    assert!(
        request.contains("\r\nProxy-Authorization: Basic dTpw\r\n"),
        "{request}"
    );
    let mut first = [0u8; 5];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"FIRST");
    stream.write_all(b"ping\n").await.unwrap();
    let mut echo = [0u8; 5];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping\n");
}

#[tokio::test]
async fn without_credentials_there_is_no_authorization_header() {
    let (proxy, request) = fake_proxy(Answer::Bytes(b"HTTP/1.1 200 OK\r\n\r\n".to_vec())).await;
    tunnel(&proxy).await.unwrap();
    let request = request.await.unwrap();
    assert!(!request.contains("Proxy-Authorization"), "{request}");
}

#[tokio::test]
async fn a_refusal_names_the_proxy_the_target_and_the_status_line() {
    let (proxy, _) = fake_proxy(Answer::Bytes(
        b"HTTP/1.1 407 Proxy Authentication Required\r\n\
          Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n"
            .to_vec(),
    ))
    .await;
    let e = tunnel(&proxy).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "proxy 127.0.0.1:{} refused CONNECT api.push.apple.com:443: 407 Proxy \
             Authentication Required",
            proxy.port
        )
    );
    for (answer, status) in [
        (&b"HTTP/1.1 403 Forbidden\r\n\r\n"[..], "403 Forbidden"),
        (&b"HTTP/1.0 502 Bad Gateway\n\n"[..], "502 Bad Gateway"),
        (
            &b"HTTP/1.1 302 Found\r\nLocation: x\r\n\r\n"[..],
            "302 Found",
        ),
    ] {
        let (proxy, _) = fake_proxy(Answer::BytesThenClose(answer.to_vec())).await;
        match tunnel(&proxy).await.unwrap_err() {
            TunnelError::Refused { status: s, .. } => assert_eq!(s, status),
            other => panic!("{other}"),
        }
    }
}

#[tokio::test]
async fn a_proxy_closing_mid_head_is_closed() {
    let (proxy, _) = fake_proxy(Answer::BytesThenClose(
        b"HTTP/1.1 200 Connection established\r\nVia: half".to_vec(),
    ))
    .await;
    let e = tunnel(&proxy).await.unwrap_err();
    assert!(matches!(e, TunnelError::Closed { .. }), "{e}");
    assert!(
        e.to_string()
            .ends_with("closed the connection before answering CONNECT api.push.apple.com:443"),
        "{e}"
    );
    let (proxy, _) = fake_proxy(Answer::BytesThenClose(Vec::new())).await;
    assert!(matches!(
        tunnel(&proxy).await.unwrap_err(),
        TunnelError::Closed { .. }
    ));
}

#[tokio::test]
async fn an_oversized_head_is_refused_at_the_limit() {
    let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
    while answer.len() <= MAX_HEAD {
        answer.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    answer.extend_from_slice(b"\r\n");
    let (proxy, _) = fake_proxy(Answer::Bytes(answer)).await;
    let e = tunnel(&proxy).await.unwrap_err();
    assert!(matches!(e, TunnelError::TooLong { .. }), "{e}");
    assert!(e.to_string().contains("longer than 16384 bytes"), "{e}");
}

#[tokio::test]
async fn something_that_is_not_http_is_said_so() {
    for answer in [
        &b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..],
        b"HTTP/1.1 abc Weird\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
    ] {
        let (proxy, _) = fake_proxy(Answer::Bytes(answer.to_vec())).await;
        let e = tunnel(&proxy).await.unwrap_err();
        assert!(matches!(e, TunnelError::NotHttp { .. }), "{e}");
        assert!(!e.to_string().contains('\x16'), "{e}");
    }
}

#[tokio::test]
async fn a_silent_proxy_times_out() {
    let (proxy, _) = fake_proxy(Answer::Silence).await;
    let e = open(
        &proxy,
        "api.push.apple.com",
        443,
        Duration::from_millis(200),
        |_| Ok(()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "proxy 127.0.0.1:{} did not answer CONNECT api.push.apple.com:443 within 200ms",
            proxy.port
        )
    );
}

#[tokio::test]
async fn no_proxy_listening_is_a_connect_error_naming_it() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = Proxy {
        host: "127.0.0.1".into(),
        port,
        authorization: None,
    };
    let e = tunnel(&proxy).await.unwrap_err();
    assert!(matches!(e, TunnelError::Connect { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("cannot connect to proxy 127.0.0.1:{port}: ")),
        "{e}"
    );
}

#[tokio::test]
async fn targets_are_written_as_authorities_and_checked() {
    assert_eq!(authority("::1", 2197), "[::1]:2197");
    assert_eq!(authority("localhost", 443), "localhost:443");
    let (proxy, _) = fake_proxy(Answer::Silence).await;
    let e = open(
        &proxy,
        "evil\r\nX-Injected: 1",
        443,
        Duration::from_secs(1),
        |_| Ok(()),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, TunnelError::BadTarget { .. }), "{e}");
}
