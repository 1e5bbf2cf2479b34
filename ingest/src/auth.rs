//! Who may call what (SPEC §7).
//!
//! Bearer tokens: a TOML file of `[[token]]` entries, each the SHA-256 of a token (never the token
//! itself) bound either to one `pc_id` (that agent may write its own runs), to
//! `role = "reader"` (may read Activity) or to `role = "operator"` (may read, and act: cancel
//! runs), with an optional `name` saying whose it is (an operator's actions are recorded under
//! it). Under mTLS the client certificate's identity binds the connection instead (see
//! [`crate::tls`]); certificates identify endpoints, never people. With neither, every caller is
//! trusted — which is why ingest then refuses non-loopback addresses unless told otherwise.
//!
//! Health and reflection need no token: probes and grpcurl `list` must work without one.
//!
//! The tokens file is read again every `--tokens-reload-every`, and a change taken once two
//! checks in a row read the same text: a token added with `token add` (or a Kubernetes Secret
//! replaced) is honoured, and a removed one refused from its next call (its console sessions
//! open no more pages), without a restart; calls it holds open (an agent's stream, a live
//! tail, a console page's live updates) watch their [`HeldToken`] and end. A file that changed
//! but does not load keeps the previous tokens, with an error logged.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::{Request, Status};

use crate::tls::Peer;

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent: it may write runs of this endpoint only.
    Agent { pc_id: String },
    /// May read Activity (and the console).
    Reader { name: String },
    /// May read, and act on runs (Control: cancel).
    Operator { name: String },
}

impl Identity {
    /// Whether it may read Activity and the console.
    pub fn may_read(&self) -> bool {
        matches!(self, Identity::Reader { .. } | Identity::Operator { .. })
    }

    /// Whether it may act on runs.
    pub fn may_act(&self) -> bool {
        matches!(self, Identity::Operator { .. })
    }

    /// How an action is recorded: the token's name, or the endpoint.
    pub fn name(&self) -> &str {
        match self {
            Identity::Agent { pc_id } => pc_id,
            Identity::Reader { name } | Identity::Operator { name } => name,
        }
    }
}

/// Who an action is recorded under when ingest runs without authentication.
pub const ANONYMOUS: &str = "anonymous (ingest runs without tokens)";

/// Longest token `name`, in bytes.
pub const MAX_TOKEN_NAME_BYTES: usize = 64;

/// What a service lets its callers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Write runs of one endpoint (Ingest): agents.
    Write,
    /// Read Activity: readers and operators.
    Read,
    /// Act on runs (Control/CancelExecution): operators.
    Act,
    /// Decided per call by the service ([`permit`]): Control, where watching a run's output
    /// (TailExecution) is reading and cancelling it is acting. Every method must call
    /// [`permit`] first (a test calls each method listed by reflection with an endpoint's
    /// token and expects PERMISSION_DENIED).
    PerCall,
}

/// Who called, before anything is allowed: what a service deciding per call keeps until the
/// call says what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// No authentication is configured, and no certificate was shown.
    Anonymous,
    /// A client certificate (an endpoint's), and no tokens file to identify people.
    Certificate,
    /// A valid token.
    Token(Identity),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default, rename = "token")]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    sha256: String,
    pc_id: Option<String>,
    role: Option<String>,
    name: Option<String>,
}

/// SHA-256 of a secret, in lowercase hex (how the tokens file names a token).
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The tokens file, as last read.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    current: RwLock<Loaded>,
    /// What the rereading checks found so far (only they touch it).
    check: Mutex<Check>,
    /// Counts the changes taken: calls still running on a token look again when it moves.
    changes: watch::Sender<u64>,
}

/// What the checks of the tokens file found since the tokens in force were read.
#[derive(Debug, Default)]
struct Check {
    /// SHA-256 of a changed text seen by the last check: taken if the next one reads it too.
    changed_to: Option<String>,
    /// Checks in a row that could not read the file.
    unreadable: u32,
}

/// One reading of the tokens file.
#[derive(Debug)]
struct Loaded {
    /// SHA-256 of the file's text: whether it changed since.
    text_sha256: String,
    by_hash: HashMap<String, Identity>,
}

impl Tokens {
    /// Reads a tokens file; errors name the file and the entry.
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the tokens file {}", path.display()))?;
        Ok(Tokens {
            path: path.to_path_buf(),
            current: RwLock::new(parse(path, &text)?),
            check: Mutex::default(),
            changes: watch::Sender::new(0),
        })
    }

    /// The hold of a call admitted with the token whose SHA-256 this is, as `identity`.
    pub fn hold(self: &Arc<Self>, sha256: String, identity: Identity) -> HeldToken {
        HeldToken {
            changes: self.changes.subscribe(),
            tokens: self.clone(),
            sha256,
            identity,
        }
    }

    /// The identity a presented token proves, if any.
    pub fn identify(&self, token: &str) -> Option<Identity> {
        self.by_sha256(&sha256_hex(token))
    }

    /// The identity of the token whose SHA-256 (hex) this is, while the file still lists it.
    pub fn by_sha256(&self, sha256: &str) -> Option<Identity> {
        self.read().by_hash.get(sha256).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the file again and takes its tokens once a changed text has been read by two
    /// checks in a row: a file caught mid-write (emptied, half written) is never taken. A
    /// changed text that does not load keeps the previous tokens serving, logged once per change;
    /// a file that cannot be read keeps them too, with a warning once it stays unreadable.
    pub fn reload_if_changed(&self) {
        let mut check = self.check.lock().unwrap_or_else(|e| e.into_inner());
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) => {
                check.unreadable += 1;
                // Once: a file briefly missing (replaced by hand) is read again next time.
                if check.unreadable == 2 {
                    tracing::warn!(file = %self.path.display(), error = %err,
                        "cannot read the tokens file; the tokens read before still apply");
                }
                return;
            }
        };
        check.unreadable = 0;
        let text_sha256 = sha256_hex(&text);
        if self.read().text_sha256 == text_sha256 {
            check.changed_to = None;
            return;
        }
        if check.changed_to.as_deref() != Some(text_sha256.as_str()) {
            check.changed_to = Some(text_sha256);
            return;
        }
        check.changed_to = None;
        // Parsed before the lock is taken: callers being identified never wait for it.
        match parse(&self.path, &text) {
            Ok(loaded) => {
                let tokens = loaded.by_hash.len();
                *self.write() = loaded;
                self.changes.send_modify(|n| *n += 1);
                tracing::info!(file = %self.path.display(), tokens, "tokens file changed; reloaded");
            }
            Err(err) => {
                self.write().text_sha256 = text_sha256;
                tracing::error!(
                    error = %format!("{err:#}"),
                    "tokens file changed but cannot be used; the previous tokens still apply"
                );
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Loaded> {
        self.current.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The token a call that stays open (an agent's stream, a live tail, a console page's live
/// updates) was admitted with, to end it once the token is withdrawn: removed from the tokens
/// file, or bound to something else.
#[derive(Debug, Clone)]
pub struct HeldToken {
    tokens: Arc<Tokens>,
    changes: watch::Receiver<u64>,
    sha256: String,
    identity: Identity,
}

impl HeldToken {
    /// Returns once the token no longer speaks for the identity it was admitted as.
    pub async fn withdrawn(&mut self) {
        loop {
            if self.changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.tokens.by_sha256(&self.sha256).as_ref() != Some(&self.identity) {
                return;
            }
        }
    }
}

/// Returns once `held` is withdrawn; never without one (no tokens file, a certificate).
pub async fn withdrawn(held: &mut Option<HeldToken>) {
    match held {
        Some(held) => held.withdrawn().await,
        None => std::future::pending().await,
    }
}

/// What an open call says when its token is withdrawn.
pub fn withdrawn_status() -> Status {
    Status::unauthenticated(
        "the token this call was admitted with was removed from ingest's tokens file (or now \
         speaks for someone else)",
    )
}

/// The tokens of a tokens file's `text`; errors name the file and the entry.
fn parse(path: &Path, text: &str) -> anyhow::Result<Loaded> {
    let file: TokensFile =
        toml::from_str(text).map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))?;
    let mut by_hash = HashMap::new();
    for (i, entry) in file.tokens.into_iter().enumerate() {
        let at = || format!("tokens file {}: [[token]] #{}", path.display(), i + 1);
        let hash = entry.sha256.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{}: sha256 must be 64 hex digits", at());
        }
        if let Some(name) = &entry.name
            && !valid_name(name)
        {
            bail!(
                "{}: name must be 1 to {MAX_TOKEN_NAME_BYTES} printable characters",
                at()
            );
        }
        // Unnamed, a person's token is known by the start of its hash (findable in the file).
        let name = entry
            .name
            .unwrap_or_else(|| format!("token {}", &hash[..12]));
        let identity = match (entry.pc_id, entry.role.as_deref()) {
            (Some(pc_id), None) if !pc_id.is_empty() => Identity::Agent { pc_id },
            (None, Some("reader")) => Identity::Reader { name },
            (None, Some("operator")) => Identity::Operator { name },
            _ => bail!(
                "{}: give either pc_id = \"…\", role = \"reader\" or role = \"operator\"",
                at()
            ),
        };
        by_hash.insert(hash, identity);
    }
    Ok(Loaded {
        text_sha256: sha256_hex(text),
        by_hash,
    })
}

fn valid_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= MAX_TOKEN_NAME_BYTES
        && !name.chars().any(char::is_control)
}

/// What a new token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewToken {
    /// An endpoint's agent.
    Agent { pc_id: String },
    /// A person or tool that reads.
    Reader { name: Option<String> },
    /// A person or tool that reads and acts.
    Operator { name: Option<String> },
}

/// Creates a token, appends its hash to the tokens file (created 0600 when missing) and returns
/// the token, which is shown once and stored nowhere.
pub fn add_token(path: &Path, new: &NewToken) -> anyhow::Result<String> {
    let name = match new {
        NewToken::Agent { .. } => None,
        NewToken::Reader { name } | NewToken::Operator { name } => name.as_deref(),
    };
    if let Some(name) = name
        && !valid_name(name)
    {
        bail!("--name must be 1 to {MAX_TOKEN_NAME_BYTES} printable characters");
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    if path.exists() {
        Tokens::load(path)?; // never append to a file we could not read back
    }
    let mut binding = match new {
        NewToken::Agent { pc_id } => format!("pc_id = {}", toml::Value::String(pc_id.clone())),
        NewToken::Reader { .. } => "role = \"reader\"".to_string(),
        NewToken::Operator { .. } => "role = \"operator\"".to_string(),
    };
    if let Some(name) = name {
        binding.push_str(&format!(
            "\nname = {}",
            toml::Value::String(name.to_string())
        ));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the tokens file {}", path.display()))?;
    writeln!(
        file,
        "\n[[token]]\nsha256 = \"{}\"\n{binding}",
        sha256_hex(&token)
    )
    .with_context(|| format!("writing the tokens file {}", path.display()))?;
    Ok(token)
}

/// Decides who the caller of one service is, from its client certificate (under mTLS) and its
/// `authorization: Bearer …` metadata.
///
/// - Writing (Ingest): a verified client certificate binds the connection to its identity; else,
///   with a tokens file, an agent token binds it to the token's `pc_id`; else (no authentication
///   configured) anything goes.
/// - Reading (Activity): with a tokens file or under mTLS only a reader or operator token passes,
///   so an endpoint's certificate or token never reads other endpoints' outputs.
/// - Acting (Control/CancelExecution): likewise, only an operator token; watching a run's
///   output (Control/TailExecution) is reading. Control decides per call ([`permit`]).
#[derive(Debug, Clone)]
pub struct Authenticator {
    tokens: Option<Arc<Tokens>>,
    access: Access,
}

impl Authenticator {
    pub fn new(tokens: Option<Arc<Tokens>>, access: Access) -> Authenticator {
        Authenticator { tokens, access }
    }

    /// A tonic interceptor: attaches the caller's [`Identity`] (and the [`HeldToken`] it came
    /// with) to the request, or refuses it.
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certificate = request
            .extensions()
            .get::<Peer>()
            .and_then(|peer| peer.certificate_identity.clone());
        let mut held = None;
        let identity = match self.access {
            Access::Write => match certificate {
                Some(pc_id) => Some(Identity::Agent {
                    pc_id: pc_id.to_string(),
                }),
                None => self.token(&request)?.map(|(identity, token)| {
                    held = Some(token);
                    identity
                }),
            },
            Access::Read | Access::Act => {
                let (caller, token) = self.caller(&request, certificate.is_some())?;
                held = token;
                judge(&caller, self.access)?
            }
            Access::PerCall => {
                let (caller, token) = self.caller(&request, certificate.is_some())?;
                held = token;
                request.extensions_mut().insert(caller);
                None
            }
        };
        if let Some(identity) = identity {
            request.extensions_mut().insert(identity);
        }
        if let Some(held) = held {
            request.extensions_mut().insert(held);
        }
        Ok(request)
    }

    /// The identity the request's token proves, and its hold; `None` when no tokens file is
    /// configured.
    fn token<T>(&self, request: &Request<T>) -> Result<Option<(Identity, HeldToken)>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this ingest requires a token: send `authorization: Bearer TOKEN`",
                )
            })?;
        let sha256 = sha256_hex(presented.trim());
        let identity = tokens
            .by_sha256(&sha256)
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        Ok(Some((identity.clone(), tokens.hold(sha256, identity))))
    }

    /// Who a person-facing call comes from, and the token it holds; refused only for a missing
    /// or unknown token.
    fn caller<T>(
        &self,
        request: &Request<T>,
        has_certificate: bool,
    ) -> Result<(Caller, Option<HeldToken>), Status> {
        if self.tokens.is_none() {
            let caller = if has_certificate {
                Caller::Certificate
            } else {
                Caller::Anonymous
            };
            return Ok((caller, None));
        }
        let (identity, held) = self.token(request)?.expect("a tokens file is configured");
        Ok((Caller::Token(identity), Some(held)))
    }
}

/// Whether `caller` may do what `access` says: its identity when it has one, or the refusal,
/// naming the role needed.
fn judge(caller: &Caller, access: Access) -> Result<Option<Identity>, Status> {
    let (needed, make) = match access {
        Access::Act => (
            "an operator token",
            "kanade-ingest token add --operator --name NAME",
        ),
        _ => (
            "a reader token (or an operator's)",
            "kanade-ingest token add --reader",
        ),
    };
    let identity = match caller {
        Caller::Anonymous => return Ok(None),
        Caller::Certificate => {
            return Err(Status::permission_denied(format!(
                "client certificates identify endpoints, which may not do this; it needs \
                 {needed}: start ingest with --tokens-file and create one with `{make}`"
            )));
        }
        Caller::Token(identity) => identity,
    };
    let allowed = match access {
        Access::Act => identity.may_act(),
        _ => identity.may_read(),
    };
    if allowed {
        return Ok(Some(identity.clone()));
    }
    Err(Status::permission_denied(match identity {
        Identity::Agent { .. } => {
            format!("this token may only write its endpoint's runs; this needs {needed} (`{make}`)")
        }
        _ => format!(
            "a reader token may only read; this needs {needed}, role = \"operator\" (`{make}`)"
        ),
    }))
}

/// For a service deciding per call ([`Access::PerCall`]): whether this call's caller may do
/// what `access` says; on success the caller's identity is attached, as [`Authenticator::check`]
/// does for other services.
pub fn permit<T>(request: &mut Request<T>, access: Access) -> Result<(), Status> {
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the caller was not identified (no authenticator)"))?;
    if let Some(identity) = judge(&caller, access)? {
        request.extensions_mut().insert(identity);
    }
    Ok(())
}

/// The endpoint a request's token or certificate binds it to; `Err` when it may not write at all.
pub fn writer_pc_id<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    match request.extensions().get::<Identity>() {
        None => Ok(None),
        Some(Identity::Agent { pc_id }) => Ok(Some(pc_id.clone())),
        Some(Identity::Reader { .. } | Identity::Operator { .. }) => Err(
            Status::permission_denied("a reader or operator token cannot send events"),
        ),
    }
}

/// Who a request acts as, for the record: its token's name, or [`ANONYMOUS`] without
/// authentication.
pub fn actor<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Identity>()
        .map(|identity| identity.name().to_string())
        .unwrap_or_else(|| ANONYMOUS.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_identified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let agent = add_token(
            &path,
            &NewToken::Agent {
                pc_id: "pc-1".into(),
            },
        )
        .unwrap();
        let reader = add_token(&path, &NewToken::Reader { name: None }).unwrap();
        let operator = add_token(
            &path,
            &NewToken::Operator {
                name: Some("alice".into()),
            },
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&agent) && !text.contains(&reader), "{text}");
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(
            tokens.identify(&agent),
            Some(Identity::Agent {
                pc_id: "pc-1".into()
            })
        );
        let reader_name = format!("token {}", &sha256_hex(&reader)[..12]);
        assert_eq!(
            tokens.identify(&reader),
            Some(Identity::Reader { name: reader_name })
        );
        assert_eq!(
            tokens.identify(&operator),
            Some(Identity::Operator {
                name: "alice".into()
            })
        );
        assert_eq!(tokens.identify("guess"), None);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_changed_file_is_taken_once_two_checks_read_it_and_never_half_written_or_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let first = add_token(&path, &NewToken::Reader { name: None }).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        let second = add_token(&path, &NewToken::Reader { name: None }).unwrap();
        let both = std::fs::read_to_string(&path).unwrap();
        let knows = |token: &str| tokens.identify(token).is_some();

        tokens.reload_if_changed();
        assert!(!knows(&second), "one check saw the change: not taken yet");
        tokens.reload_if_changed();
        assert!(knows(&first) && knows(&second), "two checks agree: taken");

        // Caught mid-write (emptied, then half written): never two checks alike, never taken.
        for text in ["", &both[..both.len() / 2]] {
            std::fs::write(&path, text).unwrap();
            tokens.reload_if_changed();
        }
        assert!(knows(&first) && knows(&second));
        // A broken file, however long it stays, and a missing one change nothing.
        std::fs::write(&path, format!("{both}\n[[token]]\nsha256 = \"short\"\n")).unwrap();
        for _ in 0..3 {
            tokens.reload_if_changed();
        }
        std::fs::remove_file(&path).unwrap();
        for _ in 0..3 {
            tokens.reload_if_changed();
        }
        assert!(knows(&first) && knows(&second));

        // The first token's entry removed: refused after two checks.
        let without_first: String = both
            .split("\n[[token]]")
            .filter(|entry| !entry.contains(&sha256_hex(&first)))
            .collect::<Vec<_>>()
            .join("\n[[token]]");
        std::fs::write(&path, without_first).unwrap();
        tokens.reload_if_changed();
        tokens.reload_if_changed();
        assert!(!knows(&first) && knows(&second));
    }

    #[test]
    fn a_bad_entry_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, "[[token]]\nsha256 = \"abc\"\npc_id = \"x\"\n").unwrap();
        let err = format!("{:#}", Tokens::load(&path).unwrap_err());
        assert!(err.contains("#1") && err.contains("64 hex digits"), "{err}");
        std::fs::write(
            &path,
            format!(
                "[[token]]\nsha256 = \"{}\"\nrole = \"admin\"\n",
                "a".repeat(64)
            ),
        )
        .unwrap();
        let err = format!("{:#}", Tokens::load(&path).unwrap_err());
        assert!(err.contains("role = \"operator\""), "{err}");
        assert!(
            add_token(
                &path,
                &NewToken::Operator {
                    name: Some("tab\there".into())
                }
            )
            .is_err()
        );
    }
}
