use super::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A STUN Binding request header (20 bytes, no attributes).
fn stun_header() -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&[7; 12]);
    m
}

#[test]
fn every_first_byte() {
    for b in 0u8..=255 {
        let want = match b {
            0x16 => Some(Kind::Tls),
            // The first letters of GET, HEAD, DELETE, OPTIONS, CONNECT: wait and see.
            b'G' | b'H' | b'D' | b'O' | b'C' => None,
            0x40..=0x4f => Some(Kind::Turn),
            // Top two bits 00: could be STUN, the cookie decides.
            0x00..=0x3f => None,
            _ => Some(Kind::Other),
        };
        assert_eq!(classify(&[b], true), want, "first byte {b:#04x}");
    }
}

#[test]
fn decrypted_bytes_are_never_tls() {
    assert_eq!(
        classify(&[0x16, 3, 1, 0, 0x10, 1, 0, 0], false),
        Some(Kind::Other)
    );
    assert_eq!(classify(b"GET / HTTP/1.1\r\n", false), Some(Kind::Other));
    assert_eq!(classify(b"PRI * HTTP/2.0", false), Some(Kind::Other));
    assert_eq!(classify(&stun_header(), false), Some(Kind::Turn));
    assert_eq!(classify(&[0x40, 0x00, 0x00, 0x04], false), Some(Kind::Turn));
}

#[test]
fn stun_needs_the_cookie_and_says_so_one_byte_at_a_time() {
    let h = stun_header();
    assert_eq!(classify(&[], true), None);
    for n in 1..8 {
        assert_eq!(classify(&h[..n], true), None, "{n} bytes");
    }
    for n in 8..=h.len() {
        assert_eq!(classify(&h[..n], true), Some(Kind::Turn), "{n} bytes");
    }
}

#[test]
fn a_wrong_cookie_is_decided_at_its_first_wrong_byte() {
    // RFC 3489 (classic STUN) has no cookie: not served here.
    assert_eq!(classify(&[0, 1, 0, 0, 0x99], true), Some(Kind::Other));
    assert_eq!(
        classify(&[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x43], true),
        Some(Kind::Other)
    );
    assert_eq!(classify(&[0, 1, 0, 0, 0x21, 0x12], true), None);
}

#[test]
fn channel_data_or_an_http_method() {
    for m in ["GET ", "HEAD ", "DELETE ", "OPTIONS ", "CONNECT "] {
        let b = m.as_bytes();
        for n in 1..b.len() {
            assert_eq!(classify(&b[..n], true), None, "{m:?} after {n} bytes");
        }
        assert_eq!(classify(b, true), Some(Kind::Other), "{m:?}");
        assert_eq!(classify(b, false), Some(Kind::Other), "{m:?} decrypted");
    }
    // ChannelData on channel 0x4000 / 0x4001 / 0x4745 ("GE" then not "T ").
    assert_eq!(classify(&[0x40, 0x00], true), Some(Kind::Turn));
    assert_eq!(classify(&[0x40, 0x01, 0x00, 0x04], false), Some(Kind::Turn));
    assert_eq!(classify(&[0x47, 0x45, 0x00, 0x10], true), Some(Kind::Turn));
    assert_eq!(classify(b"GETX", true), Some(Kind::Turn));
    // Lower-case is not a method and not ChannelData.
    assert_eq!(classify(b"get ", true), Some(Kind::Other));
}

#[test]
fn alpn_ids() {
    assert_eq!(by_alpn(Some(b"stun.turn")), Some(Kind::Turn));
    assert_eq!(by_alpn(Some(b"stun.nat-discovery")), Some(Kind::Turn));
    assert_eq!(by_alpn(Some(b"h2")), Some(Kind::Other));
    assert_eq!(by_alpn(Some(b"http/1.1")), Some(Kind::Other));
    assert_eq!(by_alpn(Some(b"acme-tls/1")), None);
    assert_eq!(by_alpn(None), None);
}

#[test]
fn the_plain_http_answer_is_a_complete_response() {
    let a = String::from_utf8(not_tls_answer()).unwrap();
    let (head, body) = a.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 "));
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(len, body.len());
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    client.set_nodelay(true).unwrap();
    (client, server)
}

#[tokio::test]
async fn peeking_consumes_nothing_even_one_byte_at_a_time() {
    let (mut client, server) = pair().await;
    let sniff = tokio::spawn(async move {
        let kind = sniff_tcp(&server, Duration::from_secs(10)).await;
        (kind, server)
    });
    let h = stun_header();
    for b in &h {
        client.write_all(&[*b]).await.unwrap();
        client.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let (kind, mut server) = sniff.await.unwrap();
    assert_eq!(kind.unwrap(), Kind::Turn);
    // Every byte is still there for the TURN handler.
    let mut got = vec![0u8; h.len()];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(got, h);
}

#[tokio::test]
async fn a_tls_record_is_decided_on_its_first_byte() {
    let (mut client, server) = pair().await;
    client.write_all(&[0x16]).await.unwrap();
    assert_eq!(
        sniff_tcp(&server, Duration::from_secs(10)).await.unwrap(),
        Kind::Tls
    );
}

#[tokio::test]
async fn garbage_and_plain_http_are_other() {
    for bytes in [
        &b"GET / HTTP/1.1\r\n"[..],
        &[0xff, 0x00][..],
        &[0x00; 8][..],
    ] {
        let (mut client, server) = pair().await;
        client.write_all(bytes).await.unwrap();
        assert_eq!(
            sniff_tcp(&server, Duration::from_secs(10)).await.unwrap(),
            Kind::Other,
            "{bytes:?}"
        );
    }
}

#[tokio::test]
async fn a_silent_client_times_out_and_a_closed_one_is_closed() {
    let (_client, server) = pair().await;
    let r = sniff_tcp(&server, Duration::from_millis(200)).await;
    assert!(matches!(r, Err(SniffError::TimedOut)), "{r:?}");

    // Three bytes of a possible STUN header, then nothing more.
    let (mut client, server) = pair().await;
    client.write_all(&[0, 1, 0]).await.unwrap();
    let r = sniff_tcp(&server, Duration::from_millis(200)).await;
    assert!(matches!(r, Err(SniffError::TimedOut)), "{r:?}");

    let (client, server) = pair().await;
    drop(client);
    let r = sniff_tcp(&server, Duration::from_secs(10)).await;
    assert!(matches!(r, Err(SniffError::Closed)), "{r:?}");
}

#[tokio::test]
async fn a_decrypted_stream_gets_its_first_bytes_back() {
    let (mut a, b) = tokio::io::duplex(64);
    a.write_all(b"GE").await.unwrap();
    let writer = tokio::spawn(async move {
        a.write_all(b"T / HTTP/1.1\r\n\r\n").await.unwrap();
        a
    });
    let (kind, mut s) = sniff_stream(b, Duration::from_secs(10)).await.unwrap();
    assert_eq!(kind, Kind::Other);
    let _a = writer.await.unwrap();
    let mut got = vec![0u8; 18];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");

    // STUN split over reads: decided at the cookie, every byte served again.
    let (mut a, b) = tokio::io::duplex(64);
    let h = stun_header();
    let h2 = h.clone();
    tokio::spawn(async move {
        for c in h2.chunks(3) {
            a.write_all(c).await.unwrap();
            tokio::task::yield_now().await;
        }
        a
    });
    let (kind, mut s) = sniff_stream(b, Duration::from_secs(10)).await.unwrap();
    assert_eq!(kind, Kind::Turn);
    let mut got = vec![0u8; h.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, h);
}

#[tokio::test]
async fn a_decrypted_stream_that_stays_silent_times_out() {
    let (_a, b) = tokio::io::duplex(64);
    let r = sniff_stream(b, Duration::from_millis(100)).await;
    assert!(matches!(r, Err(SniffError::TimedOut)));
}
