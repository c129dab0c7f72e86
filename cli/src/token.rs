//! The bearer token stowctl sends to a worker, which checks it with a
//! TokenReview for the audience `stowage` and authorizes the call with
//! ordinary RBAC. Where it comes from, first found wins:
//!
//! 1. `--token-file` (env `STOWAGE_TOKEN_FILE`), read at every run, so a
//!    kubelet-rotated projected token or `<(kubectl create token …)` works;
//! 2. a projected ServiceAccount token for the audience `stowage` at
//!    [`PROJECTED_TOKEN`] (the path the README's pod example mounts);
//! 3. the kubeconfig's current user (`KUBECONFIG`, else `~/.kube/config`):
//!    its `token`, its `tokenFile`, or what its `exec` credential plugin
//!    prints (`client.authentication.k8s.io` ExecCredential).
//!
//! None found: no token is sent, and a worker that wants one says so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// Where a pod mounts a projected ServiceAccount token for the audience
/// `stowage` (see the README's Security model).
pub const PROJECTED_TOKEN: &str = "/var/run/secrets/tokens/stowage";

/// Longest token accepted from any source (ServiceAccount tokens are about
/// 1 KiB; cloud exec plugins print a few KiB).
const MAX_TOKEN: usize = 64 * 1024;

/// How long an `exec` credential plugin may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TokenArgs {
    /// A file holding the bearer token to send (a token for the audience
    /// `stowage`, e.g. `kubectl create token NAME --audience stowage`).
    /// Without it: a projected token at /var/run/secrets/tokens/stowage,
    /// else the kubeconfig's current user.
    #[arg(long, env = "STOWAGE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Send no token at all (a worker started with --auth-mode none).
    #[arg(long, conflicts_with = "token_file")]
    pub no_token: bool,
}

/// A token and where it came from (for messages; never the token itself).
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub source: String,
}

impl TokenArgs {
    /// The token to send, if any.
    pub async fn resolve(&self) -> anyhow::Result<Option<Token>> {
        if self.no_token {
            return Ok(None);
        }
        if let Some(path) = &self.token_file {
            return read_token(path)
                .with_context(|| format!("--token-file {}", path.display()))
                .map(Some);
        }
        let projected = Path::new(PROJECTED_TOKEN);
        if projected.exists() {
            return read_token(projected).map(Some);
        }
        match kubeconfig_path() {
            Some(path) if path.exists() => from_kubeconfig(&path).await,
            _ => Ok(None),
        }
    }
}

/// Reads a token file: trimmed, bounded, one line of printable ASCII.
fn read_token(path: &Path) -> anyhow::Result<Token> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value = checked(&bytes).with_context(|| format!("the token in {}", path.display()))?;
    Ok(Token {
        value,
        source: path.display().to_string(),
    })
}

/// A token as HTTP can carry it in `authorization: Bearer …`.
fn checked(bytes: &[u8]) -> anyhow::Result<String> {
    if bytes.len() > MAX_TOKEN {
        bail!("is {} bytes, more than {MAX_TOKEN}", bytes.len());
    }
    let text = std::str::from_utf8(bytes)
        .ok()
        .map(str::trim)
        .filter(|t| t.bytes().all(|b| b.is_ascii_graphic()))
        .context("is not a token (printable ASCII, no spaces)")?;
    if text.is_empty() {
        bail!("is empty");
    }
    Ok(text.to_string())
}

fn kubeconfig_path() -> Option<PathBuf> {
    match std::env::var_os("KUBECONFIG") {
        // Like kubectl: the first file of the list that holds the context.
        // stowctl reads the first one.
        Some(list) => std::env::split_paths(&list).find(|p| !p.as_os_str().is_empty()),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    #[serde(default)]
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    #[serde(default)]
    users: Vec<Named<User>>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "context", alias = "user")]
    value: Option<T>,
}

#[derive(Deserialize)]
struct Context {
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct User {
    token: Option<String>,
    token_file: Option<PathBuf>,
    exec: Option<Exec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Exec {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    api_version: Option<String>,
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct ExecCredential {
    status: Option<ExecStatus>,
}

#[derive(Deserialize)]
struct ExecStatus {
    token: Option<String>,
}

/// The current user's token in the kubeconfig at `path`.
async fn from_kubeconfig(path: &Path) -> anyhow::Result<Option<Token>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config: Kubeconfig = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a kubeconfig", path.display()))?;
    let Some(current) = config.current_context.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let user_name = config
        .contexts
        .into_iter()
        .find(|c| c.name == current)
        .and_then(|c| c.value)
        .and_then(|c| c.user)
        .with_context(|| {
            format!(
                "{}: the current context {current:?} is not there",
                path.display()
            )
        })?;
    let Some(user) = config
        .users
        .into_iter()
        .find(|u| u.name == user_name)
        .and_then(|u| u.value)
    else {
        return Ok(None);
    };
    let source = format!("user {user_name:?} of {}", path.display());
    if let Some(token) = user.token.filter(|t| !t.is_empty()) {
        let value = checked(token.as_bytes()).with_context(|| format!("the token of {source}"))?;
        return Ok(Some(Token { value, source }));
    }
    if let Some(file) = user.token_file {
        // Relative to the kubeconfig's folder, as kubectl reads it.
        let file = path.parent().map_or(file.clone(), |dir| dir.join(&file));
        return read_token(&file).map(Some);
    }
    match user.exec {
        Some(exec) => run_exec(&exec)
            .await
            .with_context(|| format!("the exec credential plugin {:?} of {source}", exec.command))
            .map(|value| Some(Token { value, source })),
        None => Ok(None),
    }
}

/// Runs an exec credential plugin and returns the token it prints.
async fn run_exec(exec: &Exec) -> anyhow::Result<String> {
    let api_version = exec
        .api_version
        .clone()
        .unwrap_or_else(|| "client.authentication.k8s.io/v1".into());
    let info = serde_json::json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "spec": {"interactive": false},
    });
    let mut command = tokio::process::Command::new(&exec.command);
    command
        .args(&exec.args)
        .envs(exec.env.iter().map(|e| (&e.name, &e.value)))
        .env("KUBERNETES_EXEC_INFO", info.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let out = tokio::time::timeout(EXEC_TIMEOUT, command.output())
        .await
        .with_context(|| format!("gave no answer in {} s", EXEC_TIMEOUT.as_secs()))?
        .context("cannot run it")?;
    if !out.status.success() {
        bail!("failed ({})", out.status);
    }
    if out.stdout.len() > MAX_TOKEN {
        bail!("printed more than {MAX_TOKEN} bytes");
    }
    let credential: ExecCredential =
        serde_json::from_slice(&out.stdout).context("printed no ExecCredential")?;
    let token = credential
        .status
        .and_then(|s| s.token)
        .context("its ExecCredential has no status.token (client certificates are not sent)")?;
    checked(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn config(user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: dev\ncontexts:\n- name: other\n  \
             context: {{cluster: c, user: nobody}}\n- name: dev\n  context: {{cluster: c, user: \
             me}}\nusers:\n- name: nobody\n  user: {{token: wrong}}\n- name: me\n  user: {user}\n"
        )
    }

    #[tokio::test]
    async fn the_current_users_token_file_or_exec_plugin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();

        let path = write(d, "inline", &config("{token: abc.def}"));
        let t = from_kubeconfig(&path).await.expect("read").expect("token");
        assert_eq!(t.value, "abc.def");
        assert!(t.source.contains("user \"me\""), "{}", t.source);

        write(d, "me.token", "from-file\n");
        let path = write(d, "file", &config("{tokenFile: me.token}"));
        let t = from_kubeconfig(&path).await.expect("read").expect("token");
        assert_eq!(t.value, "from-file");

        let plugin = write(
            d,
            "plugin.sh",
            "#!/bin/sh\ntest -n \"$KUBERNETES_EXEC_INFO\" || exit 3\nprintf \
             '{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\
             \"status\":{\"token\":\"%s\"}}' \"$1-$PLUGIN_ENV\"\n",
        );
        let exec = format!(
            "{{exec: {{apiVersion: client.authentication.k8s.io/v1, command: sh, args: [{}, \
             minted], env: [{{name: PLUGIN_ENV, value: x}}]}}}}",
            plugin.display()
        );
        let path = write(d, "exec", &config(&exec));
        let t = from_kubeconfig(&path).await.expect("read").expect("token");
        assert_eq!(t.value, "minted-x");

        // A client-certificate user has no token: none is sent.
        let path = write(d, "certs", &config("{client-certificate-data: AAAA}"));
        assert!(from_kubeconfig(&path).await.expect("read").is_none());
    }

    #[tokio::test]
    async fn bad_tokens_and_plugins_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for (text, why) in [
            ("", "is empty"),
            ("two words", "not a token"),
            ("tok\0en", "not a token"),
        ] {
            let e = read_token(&write(d, "t", text)).err().expect("refused");
            assert!(format!("{e:#}").contains(why), "{text:?}: {e:#}");
        }
        let e = read_token(&write(d, "t", &"a".repeat(MAX_TOKEN + 1)))
            .err()
            .expect("refused");
        assert!(format!("{e:#}").contains("more than"), "{e:#}");

        let path = write(d, "exec", &config("{exec: {command: false}}"));
        let e = from_kubeconfig(&path).await.err().expect("refused");
        assert!(format!("{e:#}").contains("failed"), "{e:#}");
        let path = write(d, "exec", &config("{exec: {command: echo, args: [hi]}}"));
        let e = from_kubeconfig(&path).await.err().expect("refused");
        assert!(format!("{e:#}").contains("no ExecCredential"), "{e:#}");

        let path = write(d, "broken", "current-context: [");
        assert!(from_kubeconfig(&path).await.is_err());
        let path = write(d, "nocontext", "current-context: gone\ncontexts: []\n");
        let e = from_kubeconfig(&path).await.err().expect("refused");
        assert!(format!("{e:#}").contains("not there"), "{e:#}");
    }
}
