//! The worker's gRPC port over TLS, end to end: a real worker (on the
//! stack's PostgreSQL, NATS and LocalStack) started with --grpc-tls-cert and
//! --grpc-tls-key, and stowctl's own client (`stowctl::grpc::connect`)
//! trusting a CA or not, with a client certificate or not.

mod support;

use std::path::{Path, PathBuf};

use stowage_proto::v1::GetStatusRequest;
use stowage_proto::v1::worker_status_client::WorkerStatusClient;
use stowctl::grpc::{WorkerTls, connect};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A CA of the test's own and what it signs.
struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("CA").pem();
        TestCa { params, key, pem }
    }

    /// `(certificate PEM, key PEM)` for these names (DNS names or IPs).
    fn sign(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        if client {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

/// Replaces a file the way a Secret volume or cert-manager does: a new
/// file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn trusting(ca: &Path) -> WorkerTls {
    WorkerTls {
        ca_file: Some(ca.to_path_buf()),
        ..Default::default()
    }
}

async fn status(url: &str, tls: &WorkerTls) -> anyhow::Result<String> {
    let channel = connect(url, tls).await?;
    let reply = WorkerStatusClient::new(channel)
        .get_status(GetStatusRequest {})
        .await
        .map_err(|s| tls.explain(url, &s))?;
    Ok(reply.into_inner().worker_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_refuses_a_wrong_ca_and_reloads_its_certificate() {
    let h = support::Harness::new("localstack").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let stack_ca = PathBuf::from(h.env.get("STOWAGE_TLS_CA"));
    // The worker's files: the stack's server certificate, to be replaced.
    let cert = write(
        dir.path(),
        "tls.crt",
        &std::fs::read_to_string(h.env.get("STOWAGE_TLS_SERVER_CERT")).expect("server cert"),
    );
    let key = write(
        dir.path(),
        "tls.key",
        &std::fs::read_to_string(h.env.get("STOWAGE_TLS_SERVER_KEY")).expect("server key"),
    );
    let worker = h
        .worker_with(
            &[
                &format!("--grpc-tls-cert={}", cert.display()),
                &format!("--grpc-tls-key={}", key.display()),
                "--worker-id=tls-worker",
            ],
            None,
        )
        .await;
    let url = format!("https://127.0.0.1:{}", worker.grpc_addr.port());

    assert_eq!(
        status(&url, &trusting(&stack_ca))
            .await
            .expect("status over TLS"),
        "tls-worker"
    );
    let channel = connect(&url, &trusting(&stack_ca)).await.expect("connect");
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health over TLS")
        .into_inner();
    println!("health over TLS: {:?}", health.status());
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let plain = format!("http://127.0.0.1:{}", worker.grpc_addr.port());
    let e = status(&plain, &WorkerTls::default())
        .await
        .expect_err("plaintext refused");
    println!("plaintext client: {e:#}");
    assert!(e.to_string().contains("use an https:// URL"), "{e:#}");

    let other = TestCa::new("another CA");
    let other_ca = write(dir.path(), "other-ca.crt", &other.pem);
    let e = status(&url, &trusting(&other_ca))
        .await
        .expect_err("wrong CA");
    println!("client trusting another CA: {e:#}");
    assert!(
        e.to_string().contains(&format!(
            "the worker's certificate is not signed by the CA in --ca-file {}",
            other_ca.display()
        )),
        "{e:#}"
    );

    // Renewal: a certificate from the other CA replaces the files on disk.
    let (new_cert, new_key) = other.sign(&["127.0.0.1", "localhost"], false);
    replace(&cert, &new_cert);
    replace(&key, &new_key);
    assert_eq!(
        status(&url, &trusting(&other_ca))
            .await
            .expect("the new certificate is served"),
        "tls-worker"
    );
    let e = status(&url, &trusting(&stack_ca))
        .await
        .expect_err("old CA no longer fits");
    println!("after the renewal, a client trusting the old CA: {e:#}");
    assert!(e.to_string().contains("is not signed by the CA"), "{e:#}");
    // A connection made before the renewal goes on.
    WorkerStatusClient::new(channel)
        .get_status(GetStatusRequest {})
        .await
        .expect("an open connection keeps its certificate");

    // A half-written pair (a key that does not fit) leaves the last good one.
    let (_, stray_key) = other.sign(&["127.0.0.1"], false);
    replace(&key, &stray_key);
    status(&url, &trusting(&other_ca))
        .await
        .expect("the previous certificate stays in use");
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_client_certificates_are_required_with_a_client_ca() {
    let h = support::Harness::new("localstack").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let stack_ca = PathBuf::from(h.env.get("STOWAGE_TLS_CA"));
    let worker = h
        .worker_with(
            &[
                &format!("--grpc-tls-cert={}", h.env.get("STOWAGE_TLS_SERVER_CERT")),
                &format!("--grpc-tls-key={}", h.env.get("STOWAGE_TLS_SERVER_KEY")),
                &format!("--grpc-tls-client-ca={}", stack_ca.display()),
                "--worker-id=mtls-worker",
            ],
            None,
        )
        .await;
    let url = format!("https://localhost:{}", worker.grpc_addr.port());

    let e = status(&url, &trusting(&stack_ca))
        .await
        .expect_err("no client certificate");
    println!("without a client certificate: {e:#}");
    assert!(
        e.to_string().contains("give --cert-file and --key-file"),
        "{e:#}"
    );

    let stranger = TestCa::new("a stranger's CA");
    let (cert, key) = stranger.sign(&["stranger"], true);
    let stranger_tls = WorkerTls {
        cert_file: Some(write(dir.path(), "stranger.crt", &cert)),
        key_file: Some(write(dir.path(), "stranger.key", &key)),
        ..trusting(&stack_ca)
    };
    let e = status(&url, &stranger_tls)
        .await
        .expect_err("unknown client CA");
    println!("with a certificate of another CA: {e:#}");
    assert!(
        e.to_string().contains("give --cert-file and --key-file"),
        "{e:#}"
    );

    let client = WorkerTls {
        cert_file: Some(h.env.get("STOWAGE_TLS_CLIENT_CERT").into()),
        key_file: Some(h.env.get("STOWAGE_TLS_CLIENT_KEY").into()),
        ..trusting(&stack_ca)
    };
    assert_eq!(
        status(&url, &client)
            .await
            .expect("the stack's client certificate"),
        "mtls-worker"
    );
    worker.shutdown().await.expect("shutdown");
}
