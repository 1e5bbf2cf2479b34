//! Who may call what (SPEC §7).
//!
//! Bearer tokens: a TOML file of `[[token]]` entries, each the SHA-256 of a token (never the token
//! itself) bound either to one `pc_id` (that agent may write its own runs) or to
//! `role = "reader"` (may read Activity). Under mTLS the client certificate's identity binds the
//! connection instead (see [`crate::tls`]). With neither, every caller is trusted — which is why
//! ingest then refuses non-loopback addresses unless told otherwise.
//!
//! Health and reflection need no token: probes and grpcurl `list` must work without one.

use std::{collections::HashMap, io::Write, os::unix::fs::OpenOptionsExt, path::Path, sync::Arc};

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::tls::Peer;

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent: it may write runs of this endpoint only.
    Agent { pc_id: String },
    /// May read Activity.
    Reader,
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
}

/// SHA-256 of a secret, in lowercase hex (how the tokens file names a token).
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The loaded tokens file.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Identity>,
}

impl Tokens {
    /// Reads a tokens file; errors name the file and the entry.
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the tokens file {}", path.display()))?;
        let file: TokensFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))?;
        let mut by_hash = HashMap::new();
        for (i, entry) in file.tokens.into_iter().enumerate() {
            let at = || format!("tokens file {}: [[token]] #{}", path.display(), i + 1);
            let hash = entry.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("{}: sha256 must be 64 hex digits", at());
            }
            let identity = match (entry.pc_id, entry.role.as_deref()) {
                (Some(pc_id), None) if !pc_id.is_empty() => Identity::Agent { pc_id },
                (None, Some("reader")) => Identity::Reader,
                _ => bail!("{}: give either pc_id = \"…\" or role = \"reader\"", at()),
            };
            by_hash.insert(hash, identity);
        }
        Ok(Tokens { by_hash })
    }

    /// The identity a presented token proves, if any.
    pub fn identify(&self, token: &str) -> Option<&Identity> {
        self.by_sha256(&sha256_hex(token))
    }

    /// The identity of the token whose SHA-256 (hex) this is, while the file still lists it.
    pub fn by_sha256(&self, sha256: &str) -> Option<&Identity> {
        self.by_hash.get(sha256)
    }
}

/// Creates a token for `identity`, appends its hash to the tokens file (created 0600 when
/// missing) and returns the token, which is shown once and stored nowhere.
pub fn add_token(path: &Path, identity: &Identity) -> anyhow::Result<String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    if path.exists() {
        Tokens::load(path)?; // never append to a file we could not read back
    }
    let binding = match identity {
        Identity::Agent { pc_id } => format!("pc_id = {}", toml::Value::String(pc_id.clone())),
        Identity::Reader => "role = \"reader\"".to_string(),
    };
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
/// - Reading (Activity): with a tokens file or under mTLS only a reader token passes, so an
///   endpoint's certificate or token never reads other endpoints' outputs.
#[derive(Debug, Clone)]
pub struct Authenticator {
    tokens: Option<Arc<Tokens>>,
    /// The service reads Activity: only readers pass.
    readers_only: bool,
}

impl Authenticator {
    pub fn new(tokens: Option<Arc<Tokens>>, readers_only: bool) -> Authenticator {
        Authenticator {
            tokens,
            readers_only,
        }
    }

    /// A tonic interceptor: attaches the caller's [`Identity`] to the request, or refuses it.
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certificate = request
            .extensions()
            .get::<Peer>()
            .and_then(|peer| peer.certificate_identity.clone());
        let identity = if self.readers_only {
            self.reader(&request, certificate.is_some())?
        } else {
            match certificate {
                Some(pc_id) => Some(Identity::Agent {
                    pc_id: pc_id.to_string(),
                }),
                None => self.token(&request)?,
            }
        };
        if let Some(identity) = identity {
            request.extensions_mut().insert(identity);
        }
        Ok(request)
    }

    /// The identity the request's token proves; `None` when no tokens file is configured.
    fn token<T>(&self, request: &Request<T>) -> Result<Option<Identity>, Status> {
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
        tokens
            .identify(presented.trim())
            .cloned()
            .map(Some)
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    fn reader<T>(
        &self,
        request: &Request<T>,
        has_certificate: bool,
    ) -> Result<Option<Identity>, Status> {
        if self.tokens.is_none() {
            if has_certificate {
                return Err(Status::permission_denied(
                    "client certificates identify endpoints, which may not read Activity; \
                     reading needs a reader token: start ingest with --tokens-file and create \
                     one with `kanade-ingest token add --reader`",
                ));
            }
            return Ok(None);
        }
        match self.token(request)? {
            Some(Identity::Reader) => Ok(Some(Identity::Reader)),
            _ => Err(Status::permission_denied(
                "this token may only write its endpoint's runs; reading Activity needs a reader \
                 token (kanade-ingest token add --reader)",
            )),
        }
    }
}

/// The endpoint a request's token or certificate binds it to; `Err` when it may not write at all.
pub fn writer_pc_id<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    match request.extensions().get::<Identity>() {
        None => Ok(None),
        Some(Identity::Agent { pc_id }) => Ok(Some(pc_id.clone())),
        Some(Identity::Reader) => Err(Status::permission_denied(
            "a reader token cannot send events",
        )),
    }
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
            &Identity::Agent {
                pc_id: "pc-1".into(),
            },
        )
        .unwrap();
        let reader = add_token(&path, &Identity::Reader).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&agent) && !text.contains(&reader), "{text}");
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(
            tokens.identify(&agent),
            Some(&Identity::Agent {
                pc_id: "pc-1".into()
            })
        );
        assert_eq!(tokens.identify(&reader), Some(&Identity::Reader));
        assert_eq!(tokens.identify("guess"), None);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_bad_entry_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, "[[token]]\nsha256 = \"abc\"\npc_id = \"x\"\n").unwrap();
        let err = format!("{:#}", Tokens::load(&path).unwrap_err());
        assert!(err.contains("#1") && err.contains("64 hex digits"), "{err}");
    }
}
