//! The seams a deterministic simulation plugs turmoil's network into: a [`Dialer`] for the
//! client core's HTTP (and the gRPC connector), and [`Accepted`], a simulated connection as
//! tonic's server wants it (`serve_with_incoming`).

use fhirhaul_common::http::{Connection, Dialer};

/// Dials over turmoil's simulated network.
pub struct TurmoilDialer;

#[async_trait::async_trait]
impl Dialer for TurmoilDialer {
    async fn dial(&self, host: &str, port: u16) -> std::io::Result<Box<dyn Connection>> {
        Ok(Box::new(::turmoil::net::TcpStream::connect((host, port)).await?))
    }
}

/// An accepted turmoil connection, as tonic's server wants it.
pub struct Accepted(pub ::turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
