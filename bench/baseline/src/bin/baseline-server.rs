//! The limit of our own stack: hyper 1 + tokio-rustls with the service's TLS and HTTP settings,
//! and nothing else. A `POST` reads the whole body and answers `200` with a short JSON receipt;
//! a `GET` answers a fixed body (`--get-body FILE`, the same bytes a stored callback has) from
//! memory. No authentication, no parsing, no storage, no logging.
//!
//! `baseline-server --listen 127.0.0.1:18444 --cert cert.pem --key key.pem [--get-body FILE]`

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use callback_receiver_bench::{die, Args};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

async fn handle(
    req: Request<Incoming>,
    get_body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::POST {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return Ok(Response::builder()
                    .status(400)
                    .body(Full::new(Bytes::new()))
                    .unwrap_or_default())
            }
        };
        let receipt = format!("{{\"status\":\"stored\",\"size\":{}}}", body.len());
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(receipt)))
            .unwrap_or_default());
    }
    Ok(Response::builder()
        .header("content-type", "application/xml")
        .body(Full::new(get_body))
        .unwrap_or_default())
}

fn main() {
    let args = Args::parse();
    let listen = args.req("listen");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(args.req("cert"))
        .and_then(|it| it.collect())
        .unwrap_or_else(|e| die(&format!("cert: {e}")));
    let key =
        PrivateKeyDer::from_pem_file(args.req("key")).unwrap_or_else(|e| die(&format!("key: {e}")));
    let get_body = match args.get("get-body", "").as_str() {
        "" => Bytes::from_static(b"ok"),
        path => Bytes::from(std::fs::read(path).unwrap_or_else(|e| die(&format!("{path}: {e}")))),
    };

    // The same provider, versions and ALPN as the service (src/tls.rs).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap_or_else(|e| die(&e.to_string()))
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| die(&e.to_string()));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&e.to_string()));
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen)
            .await
            .unwrap_or_else(|e| die(&format!("bind {listen}: {e}")));
        // The same HTTP settings as the service (src/server.rs).
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .max_buf_size(65536)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .max_header_list_size(65536);
        let builder = Arc::new(builder);
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            let get_body = get_body.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req| handle(req, get_body.clone()));
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
}
