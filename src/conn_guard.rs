//! A deadline on the first bytes of a connection.
//!
//! hyper's HTTP/1.1 header read timeout only starts once hyper's HTTP/1.1 connection exists.
//! Before that, hyper-util's `auto` builder reads the first bytes itself to tell HTTP/1.1 from
//! the HTTP/2 preface, and HTTP/2 waits for the client's preface, both without any time limit:
//! a client that completes the TLS handshake and then sends nothing (or a few bytes) would hold
//! its connection, and one of the `max_connections` permits, forever. [`FirstBytes`] wraps the
//! stream and fails reads with `TimedOut` when the first [`FIRST_BYTES`] bytes have not arrived
//! within the deadline; after that it is a plain pass-through.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Bytes that must arrive in time: the length of the HTTP/2 connection preface, which is also
/// less than any HTTP/1.1 request head with a `Host` header.
pub const FIRST_BYTES: usize = 24;

/// A stream whose first [`FIRST_BYTES`] bytes must arrive before a deadline.
#[derive(Debug)]
pub struct FirstBytes<IO> {
    /// The wrapped stream.
    inner: IO,
    /// Bytes still to arrive before the deadline is lifted.
    remaining: usize,
    /// The deadline; `None` once lifted.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<IO> FirstBytes<IO> {
    /// Wraps `inner`; its first bytes must arrive within `timeout` from now.
    pub fn new(inner: IO, timeout: Duration) -> Self {
        FirstBytes {
            inner,
            remaining: FIRST_BYTES,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstBytes<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            let read = buf.filled().len() - before;
            this.remaining = this.remaining.saturating_sub(read);
            if this.remaining == 0 {
                this.deadline = None;
            }
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstBytes<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn silence_times_out_and_enough_bytes_lift_the_deadline() {
        let (client, server) = tokio::io::duplex(1024);
        let mut guarded = FirstBytes::new(server, SHORT);
        let mut buf = [0u8; 64];
        let err = guarded.read(&mut buf).await.expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);

        let (mut client, server) = tokio::io::duplex(1024);
        let mut guarded = FirstBytes::new(server, SHORT);
        client.write_all(&[b'x'; 10]).await.expect("write");
        assert_eq!(guarded.read(&mut buf).await.expect("read"), 10);
        client.write_all(&[b'y'; 14]).await.expect("write");
        assert_eq!(guarded.read(&mut buf).await.expect("read"), 14);
        // The deadline is gone: a long pause is fine now.
        tokio::time::sleep(SHORT * 2).await;
        client.write_all(b"z").await.expect("write");
        assert_eq!(guarded.read(&mut buf).await.expect("read"), 1);
    }

    #[tokio::test]
    async fn a_trickle_of_bytes_does_not_extend_the_deadline() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut guarded = FirstBytes::new(server, SHORT);
        let mut buf = [0u8; 64];
        let trickle = async {
            loop {
                if client.write_all(b"P").await.is_err() {
                    return;
                }
                tokio::time::sleep(SHORT / 6).await;
            }
        };
        let reads = async {
            loop {
                match guarded.read(&mut buf).await {
                    Ok(n) => assert_eq!(n, 1),
                    Err(e) => return e,
                }
            }
        };
        let err = tokio::select! {
            e = reads => e,
            () = trickle => panic!("the trickle stopped"),
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
