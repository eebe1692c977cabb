//! Lingering close for HTTPS connections.
//!
//! When the server ends a connection while the client is still sending (a request
//! refused with 431 because its headers are too large, say), closing the socket with
//! unread data makes the kernel send a reset, and the client may then lose the answer
//! that was already on its way. Like nginx's `lingering_close`, [`LingeringTcp`] closes
//! in two steps instead: on drop it shuts down the sending side (the answer and a FIN
//! go out) and reads and discards what the client still sends, for a bounded time and
//! amount, before the socket is closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long a closed connection keeps draining what the client still sends.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much it drains at most.
const LINGER_BYTES: usize = 1 << 20;

/// A TCP stream that closes with a bounded lingering drain when dropped.
#[derive(Debug)]
pub struct LingeringTcp {
    inner: Option<TcpStream>,
}

impl LingeringTcp {
    pub fn new(tcp: TcpStream) -> Self {
        Self { inner: Some(tcp) }
    }

    fn io(&mut self) -> io::Result<&mut TcpStream> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

fn with_io<T>(
    res: io::Result<&mut TcpStream>,
    f: impl FnOnce(Pin<&mut TcpStream>) -> Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    match res {
        Ok(tcp) => f(Pin::new(tcp)),
        Err(e) => Poll::Ready(Err(e)),
    }
}

impl AsyncRead for LingeringTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        with_io(self.get_mut().io(), |t| t.poll_read(cx, buf))
    }
}

impl AsyncWrite for LingeringTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        with_io(self.get_mut().io(), |t| t.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        with_io(self.get_mut().io(), |t| t.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        with_io(self.get_mut().io(), |t| t.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        with_io(self.get_mut().io(), |t| t.poll_shutdown(cx))
    }
}

impl Drop for LingeringTcp {
    fn drop(&mut self) {
        let Some(mut tcp) = self.inner.take() else {
            return;
        };
        // The client already closed (or the socket failed): a plain close is safe.
        let mut probe = [0u8; 1];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut rb = ReadBuf::new(&mut probe);
        match Pin::new(&mut tcp).poll_peek(&mut cx, &mut rb) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return,
            Poll::Ready(Ok(_)) | Poll::Pending => {}
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let _ = tcp.shutdown().await;
            let drain = async {
                let mut buf = [0u8; 4096];
                let mut total = 0usize;
                while total < LINGER_BYTES {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIME, drain).await;
        });
    }
}
