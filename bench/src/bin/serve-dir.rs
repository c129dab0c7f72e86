//! `serve-dir DIR`: a small, fast static file server for the upload benchmark
//! (Stowage reads HTTP(S) or S3 sources, not local files). Binds
//! `127.0.0.1:0` unless told otherwise, prints the bound port on stdout, and
//! answers `GET`/`HEAD /<path below DIR>` with the file's bytes and its
//! Content-Length. Nothing else: no listings, no ranges, no `..`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use tokio_util::io::ReaderStream;

/// Serve the files below DIR over HTTP/1.1 (benchmark helper).
#[derive(Parser)]
#[command(name = "serve-dir", version)]
struct Args {
    /// Directory whose files are served.
    dir: PathBuf,
    /// Address to bind; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Bytes read from disk per body chunk.
    #[arg(long, default_value_t = 512 * 1024)]
    chunk_size: usize,
}

struct Served {
    root: PathBuf,
    chunk_size: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = args
        .dir
        .canonicalize()
        .with_context(|| format!("{}", args.dir.display()))?;
    anyhow::ensure!(root.is_dir(), "{} is not a directory", root.display());
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    println!("{}", listener.local_addr()?.port());
    let state = Arc::new(Served {
        root,
        chunk_size: args.chunk_size.max(4096),
    });
    let app = Router::new().fallback(serve).with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn serve(State(s): State<Arc<Served>>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Some(path) = resolve(&s.root, uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return StatusCode::NOT_FOUND.into_response(),
    };
    let len = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(ReaderStream::with_capacity(file, s.chunk_size))
    };
    Response::builder()
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Maps a request path onto a file below `root`; `None` for `.`/`..`
/// segments, backslashes or NUL (no percent-decoding: names are served as
/// they are spelled).
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || seg.contains(['\\', '\0']) {
            return None;
        }
        out.push(seg);
    }
    (out != root).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_below_the_root() {
        let root = Path::new("/data");
        assert_eq!(
            resolve(root, "/small/00001.bin"),
            Some(PathBuf::from("/data/small/00001.bin"))
        );
        assert_eq!(resolve(root, "/a//b"), Some(PathBuf::from("/data/a/b")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/./b"), None);
        assert_eq!(resolve(root, "/"), None);
    }
}
