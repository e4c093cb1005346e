//! Who may do what: bearer tokens with roles, limited to category patterns,
//! and the cluster secret that peers present to each other.
//!
//! Tokens come from `--tokens-file` (reloaded on SIGHUP) and from `[[token]]`
//! tables of the `--config` file, never from the command line:
//!
//! ```toml
//! [[token]]
//! name = "shippers-eu"          # shown in logs instead of the secret
//! secret = "…"                  # at least 16 characters
//! roles = ["produce"]           # produce, consume, admin
//! categories = ["app.*", "nginx.access"]   # optional glob patterns
//! ```
//!
//! A request presents `Authorization: Bearer <secret>`, or HTTP Basic with
//! the secret as password (any user name), for shippers that offer only
//! that. Secrets are compared in constant time (over SHA-256 digests, so
//! their length does not leak either) and never logged.
//!
//! Peers present the cluster secret (`--cluster-secret-file`) the same way;
//! it opens the internal routes and reading every category (replicas copy
//! chunks through the public read route), and nothing else.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Append lines.
    Produce,
    /// Read chunks, list them, keep consumer positions.
    Consume,
    /// `/v1/admin/...`.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Produce => "produce",
            Role::Consume => "consume",
            Role::Admin => "admin",
        })
    }
}

/// One `[[token]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// A name for logs and errors (default: `token-N`).
    #[serde(default)]
    pub name: Option<String>,
    /// The secret.
    pub secret: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Category glob patterns it is limited to (default: every category).
    #[serde(default)]
    pub categories: Option<Vec<String>>,
}

/// A tokens file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// The tokens.
    #[serde(default)]
    pub token: Vec<TokenSpec>,
}

/// Shortest accepted secret.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug)]
struct Token {
    name: String,
    digest: [u8; 32],
    roles: BTreeSet<Role>,
    categories: Option<Vec<glob::Pattern>>,
}

/// Who a request is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No tokens are configured (loopback or `--allow-anonymous`).
    Anonymous,
    /// A peer that presented the cluster secret.
    Peer,
    /// A token, by name, with what it may do.
    Token {
        /// Its name.
        name: String,
        /// Its roles.
        roles: BTreeSet<Role>,
        /// Its category patterns (`None`: every category).
        categories: Option<Vec<glob::Pattern>>,
    },
}

impl Principal {
    /// True when this principal may see `category` at all.
    pub fn may_see(&self, category: &str) -> bool {
        match self {
            Principal::Anonymous | Principal::Peer => true,
            Principal::Token { categories, .. } => categories
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p.matches(category))),
        }
    }
}

impl Principal {
    /// True when this principal may see every category (no patterns).
    pub fn sees_every_category(&self) -> bool {
        match self {
            Principal::Anonymous | Principal::Peer => true,
            Principal::Token { categories, .. } => categories.is_none(),
        }
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Nothing (health checks).
    Nothing,
    /// Any valid token or the cluster secret (status, metrics).
    Anyone,
    /// A role, on a category when the route names one.
    Role(Role, Option<&'a str>),
    /// Reading chunks and listings: the consume role (on the category when
    /// the route names one), or the cluster secret.
    Read(Option<&'a str>),
    /// The cluster secret (internal routes).
    Peer,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or wrong ones: 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the right: 403.
    #[error("{0}")]
    Forbidden(String),
}

/// A problem with the tokens configuration.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokensError(pub String);

/// The node's tokens and cluster secret. Shared as `Arc<Auth>`.
#[derive(Debug)]
pub struct Auth {
    file: Option<PathBuf>,
    inline: Vec<TokenSpec>,
    tokens: RwLock<Arc<Vec<Token>>>,
    cluster: Option<[u8; 32]>,
    /// Why the last reload failed, until one succeeds (a std mutex: set
    /// and read in passing).
    reload_error: std::sync::Mutex<Option<String>>,
    /// Refused credentials not logged yet, and when the last line was
    /// written (a std mutex: held for a few instructions).
    refused: std::sync::Mutex<RefusalLog>,
}

/// Refused credentials are logged at most once per [`REFUSAL_LOG_EVERY`],
/// with how many there were since the last line.
#[derive(Debug, Default)]
struct RefusalLog {
    unlogged: u64,
    last: Option<std::time::Instant>,
}

/// Least time between two log lines about refused credentials.
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Equality of two digests in time independent of where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn build(specs: &[TokenSpec]) -> Result<Vec<Token>, TokensError> {
    let mut out = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let name = s.name.clone().unwrap_or_else(|| format!("token-{}", i + 1));
        if s.secret.len() < MIN_SECRET_LEN {
            return Err(TokensError(format!(
                "token {name}: the secret must be at least {MIN_SECRET_LEN} characters"
            )));
        }
        if s.roles.is_empty() {
            return Err(TokensError(format!("token {name}: no roles")));
        }
        let categories = s
            .categories
            .as_ref()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        glob::Pattern::new(p).map_err(|e| {
                            TokensError(format!("token {name}: bad category pattern {p:?}: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        out.push(Token {
            name,
            digest: digest(s.secret.as_bytes()),
            roles: s.roles.iter().copied().collect(),
            categories,
        });
    }
    Ok(out)
}

/// Reads a tokens file.
pub fn load_tokens_file(path: &Path) -> Result<Vec<TokenSpec>, TokensError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokensError(format!("cannot read tokens file {}: {e}", path.display())))?;
    let file: TokensFile = toml::from_str(&text)
        .map_err(|e| TokensError(format!("invalid tokens file {}: {e}", path.display())))?;
    Ok(file.token)
}

/// Warns when `path` may be read by users other than its owner and group.
pub fn warn_if_others_read(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the {what} is readable by every user of this machine; chmod 600 it");
    }
}

/// Reads a secret file (its content, trimmed).
pub fn load_secret_file(path: &Path) -> Result<String, TokensError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokensError(format!("cannot read secret file {}: {e}", path.display())))?;
    let secret = text.trim().to_owned();
    if secret.len() < MIN_SECRET_LEN {
        return Err(TokensError(format!(
            "the cluster secret in {} must be at least {MIN_SECRET_LEN} characters",
            path.display()
        )));
    }
    Ok(secret)
}

impl Auth {
    /// Tokens from `file` (if any) and `inline` (the config file's), and
    /// the cluster secret.
    pub fn new(
        file: Option<PathBuf>,
        inline: Vec<TokenSpec>,
        cluster_secret: Option<String>,
    ) -> Result<Self, TokensError> {
        let auth = Self {
            file,
            inline,
            tokens: RwLock::new(Arc::new(Vec::new())),
            cluster: cluster_secret.map(|s| digest(s.as_bytes())),
            reload_error: std::sync::Mutex::new(None),
            refused: Default::default(),
        };
        auth.reload()?;
        if let Some(f) = &auth.file {
            warn_if_others_read(f, "tokens file");
        }
        Ok(auth)
    }

    /// No tokens, no secret: everything is open.
    pub fn open() -> Self {
        Self {
            file: None,
            inline: Vec::new(),
            tokens: RwLock::new(Arc::new(Vec::new())),
            cluster: None,
            reload_error: std::sync::Mutex::new(None),
            refused: Default::default(),
        }
    }

    /// Records a request refused for its credentials (401: none, unknown,
    /// or not the cluster secret where a peer route needs it). Logged at
    /// most every 10 s (`REFUSAL_LOG_EVERY`) with the count since the last line,
    /// never with the secret presented.
    pub fn note_refused(&self, route: &str, why: &str) {
        let mut log = self.refused.lock().unwrap();
        log.unlogged += 1;
        if log.last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        let refused = std::mem::take(&mut log.unlogged);
        log.last = Some(std::time::Instant::now());
        drop(log);
        tracing::warn!(
            refused,
            route,
            reason = why,
            "requests refused for their credentials (counted since the last such line)"
        );
    }

    /// Reads the tokens file again; on error the tokens in use stay, and
    /// the error is kept for [`Auth::reload_error`] until a reload works.
    /// A tokens file that holds no token is an error (at start-up too):
    /// it would leave every route open. Returns how many tokens are in use.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let result = self.load();
        *self.reload_error.lock().unwrap() = result.as_ref().err().map(|e| e.0.clone());
        let tokens = result?;
        let n = tokens.len();
        *self.tokens.write().unwrap() = Arc::new(tokens);
        Ok(n)
    }

    fn load(&self) -> Result<Vec<Token>, TokensError> {
        let mut specs = self.inline.clone();
        if let Some(f) = &self.file {
            specs.extend(load_tokens_file(f)?);
            if specs.is_empty() {
                return Err(TokensError(format!(
                    "tokens file {} holds no token; with none, every route would be open",
                    f.display()
                )));
            }
        }
        build(&specs)
    }

    /// Why the last reload of the tokens failed, while the tokens in use
    /// are still the earlier ones.
    pub fn reload_error(&self) -> Option<String> {
        self.reload_error.lock().unwrap().clone()
    }

    /// True when clients must present a token.
    pub fn required(&self) -> bool {
        !self.tokens.read().unwrap().is_empty()
    }

    /// The cluster secret is configured.
    pub fn has_cluster_secret(&self) -> bool {
        self.cluster.is_some()
    }

    /// Whether requests of this kind pass without credentials (no tokens;
    /// for `peer` routes, no cluster secret either): the same answer as
    /// [`Auth::check`] giving [`Principal::Anonymous`] for any need.
    pub fn is_open(&self, peer: bool) -> bool {
        self.tokens.read().unwrap().is_empty() && (!peer || self.cluster.is_none())
    }

    /// Authenticates the request's credentials and checks `need`.
    pub fn check(&self, headers: &HeaderMap, need: Need<'_>) -> Result<Principal, AuthError> {
        if need == Need::Nothing {
            return Ok(Principal::Anonymous);
        }
        let tokens = self.tokens.read().unwrap().clone();
        // Without tokens the public routes are open; the internal ones are
        // open only when neither tokens nor a cluster secret are set (a
        // node with tokens and no secret has no peers to answer).
        let open = match need {
            Need::Peer => self.cluster.is_none() && tokens.is_empty(),
            _ => tokens.is_empty(),
        };
        if open {
            return Ok(Principal::Anonymous);
        }
        let Some(secret) = secret_of(headers) else {
            return Err(AuthError::Unauthenticated(
                "this node requires a token: send Authorization: Bearer <token> (or HTTP Basic with the token as password)".into(),
            ));
        };
        let d = digest(secret.as_bytes());
        // Every comparison runs, whichever matches.
        let peer = self.cluster.as_ref().is_some_and(|c| ct_eq(c, &d));
        let found = tokens.iter().fold(
            None,
            |found, t| if ct_eq(&t.digest, &d) { Some(t) } else { found },
        );
        let principal = match (peer, found) {
            (true, _) => Principal::Peer,
            (false, Some(t)) => Principal::Token {
                name: t.name.clone(),
                roles: t.roles.clone(),
                categories: t.categories.clone(),
            },
            (false, None) => {
                return Err(AuthError::Unauthenticated(
                    "the token is not valid on this node".into(),
                ));
            }
        };
        match (&principal, need) {
            (_, Need::Nothing | Need::Anyone) => Ok(principal),
            (Principal::Peer, Need::Peer) => Ok(principal),
            (_, Need::Peer) => Err(AuthError::Unauthenticated(
                "this route is for the cluster's nodes: it needs the cluster secret".into(),
            )),
            (Principal::Peer, Need::Read(_)) => Ok(principal),
            (Principal::Peer, Need::Role(role, _)) => Err(AuthError::Forbidden(format!(
                "the cluster secret does not carry the {role} role (it reads chunks and answers peers only)"
            ))),
            (
                Principal::Token { name, roles, .. },
                Need::Role(_, category) | Need::Read(category),
            ) => {
                let role = match need {
                    Need::Role(role, _) => role,
                    _ => Role::Consume,
                };
                if !roles.contains(&role) {
                    return Err(AuthError::Forbidden(format!(
                        "token {name} does not have the {role} role"
                    )));
                }
                if let Some(c) = category
                    && !principal.may_see(c)
                {
                    return Err(AuthError::Forbidden(format!(
                        "token {name} may not use category {c:?}"
                    )));
                }
                Ok(principal)
            }
            (Principal::Anonymous, _) => Ok(principal),
        }
    }
}

/// The secret of a Bearer or Basic `Authorization` header.
fn secret_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    // Splunk HEC clients send `Splunk <token>`.
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("splunk") {
        return Some(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = aws_smithy_types::base64::decode(rest.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        return Some(password.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn spec(name: &str, secret: &str, roles: &[Role], cats: Option<&[&str]>) -> TokenSpec {
        TokenSpec {
            name: Some(name.into()),
            secret: secret.into(),
            roles: roles.to_vec(),
            categories: cats.map(|c| c.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn bearer(s: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {s}")).unwrap(),
        );
        h
    }

    #[test]
    fn roles_and_categories_are_enforced() {
        let auth = Auth::new(
            None,
            vec![
                spec(
                    "ship",
                    "ship-secret-0123456789",
                    &[Role::Produce],
                    Some(&["app.*"]),
                ),
                spec(
                    "ops",
                    "ops-secret-0123456789",
                    &[Role::Consume, Role::Admin],
                    None,
                ),
            ],
            Some("cluster-secret-0123456789".into()),
        )
        .unwrap();
        let ship = bearer("ship-secret-0123456789");
        assert!(
            auth.check(&ship, Need::Role(Role::Produce, Some("app.web")))
                .is_ok()
        );
        assert!(matches!(
            auth.check(&ship, Need::Role(Role::Produce, Some("billing"))),
            Err(AuthError::Forbidden(m)) if m.contains("billing")
        ));
        assert!(matches!(
            auth.check(&ship, Need::Role(Role::Consume, Some("app.web"))),
            Err(AuthError::Forbidden(m)) if m.contains("consume")
        ));
        let ops = bearer("ops-secret-0123456789");
        assert!(auth.check(&ops, Need::Role(Role::Admin, None)).is_ok());
        assert!(matches!(
            auth.check(&ops, Need::Peer),
            Err(AuthError::Unauthenticated(_))
        ));
        let peer = bearer("cluster-secret-0123456789");
        assert_eq!(auth.check(&peer, Need::Peer), Ok(Principal::Peer));
        // The cluster secret reads, but does not carry the consume role
        // (consumers' positions, acks, deletion).
        assert!(auth.check(&peer, Need::Read(Some("x"))).is_ok());
        assert!(matches!(
            auth.check(&peer, Need::Role(Role::Consume, Some("x"))),
            Err(AuthError::Forbidden(_))
        ));
        assert!(
            auth.check(&peer, Need::Role(Role::Produce, Some("x")))
                .is_err()
        );
        assert!(matches!(
            auth.check(&HeaderMap::new(), Need::Anyone),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.check(&bearer("nope-nope-nope-nope"), Need::Anyone),
            Err(AuthError::Unauthenticated(m)) if m.contains("not valid")
        ));
        assert!(auth.check(&HeaderMap::new(), Need::Nothing).is_ok());
        // Basic with the token as password.
        let mut basic = HeaderMap::new();
        let b64 = aws_smithy_types::base64::encode("syslog:ship-secret-0123456789");
        basic.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {b64}")).unwrap(),
        );
        assert!(
            auth.check(&basic, Need::Role(Role::Produce, Some("app.x")))
                .is_ok()
        );
    }

    #[test]
    fn with_tokens_and_no_cluster_secret_the_internal_routes_are_closed() {
        let auth = Auth::new(
            None,
            vec![spec("ops", "ops-secret-0123456789", &[Role::Admin], None)],
            None,
        )
        .unwrap();
        assert!(matches!(
            auth.check(&HeaderMap::new(), Need::Peer),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.check(&bearer("ops-secret-0123456789"), Need::Peer),
            Err(AuthError::Unauthenticated(_))
        ));
    }

    #[test]
    fn without_tokens_everything_is_open() {
        let auth = Auth::open();
        assert!(!auth.required());
        assert_eq!(
            auth.check(&HeaderMap::new(), Need::Role(Role::Admin, None)),
            Ok(Principal::Anonymous)
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let short = build(&[spec("a", "short", &[Role::Admin], None)]).unwrap_err();
        assert!(short.0.contains("at least 16"), "{short}");
        let none = build(&[spec("a", "0123456789abcdefgh", &[], None)]).unwrap_err();
        assert!(none.0.contains("no roles"), "{none}");
        let pat = build(&[spec(
            "a",
            "0123456789abcdefgh",
            &[Role::Admin],
            Some(&["[a"]),
        )])
        .unwrap_err();
        assert!(pat.0.contains("pattern"), "{pat}");
    }

    #[test]
    fn a_tokens_file_reloads_and_keeps_the_old_set_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let write = |secret: &str| {
            std::fs::write(
                &path,
                format!("[[token]]\nsecret = \"{secret}\"\nroles = [\"consume\"]\n"),
            )
            .unwrap()
        };
        write("first-secret-0123456789");
        let auth = Auth::new(Some(path.clone()), Vec::new(), None).unwrap();
        let need = Need::Role(Role::Consume, Some("app"));
        assert!(auth.check(&bearer("first-secret-0123456789"), need).is_ok());
        write("second-secret-0123456789");
        assert_eq!(auth.reload().unwrap(), 1);
        assert!(
            auth.check(&bearer("first-secret-0123456789"), need)
                .is_err()
        );
        assert!(
            auth.check(&bearer("second-secret-0123456789"), need)
                .is_ok()
        );
        std::fs::write(&path, "[[token]]\nsecrt = 1\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.reload_error().is_some());
        assert!(
            auth.check(&bearer("second-secret-0123456789"), need)
                .is_ok()
        );
        // An empty file never turns authentication off.
        std::fs::write(&path, "").unwrap();
        let e = auth.reload().unwrap_err();
        assert!(e.0.contains("holds no token"), "{e}");
        assert!(auth.required());
        assert!(auth.check(&HeaderMap::new(), need).is_err());
        assert!(
            auth.check(&bearer("second-secret-0123456789"), need)
                .is_ok()
        );
        write("third-secret-0123456789");
        assert_eq!(auth.reload().unwrap(), 1);
        assert_eq!(auth.reload_error(), None);
        // Nor does it start a node without them.
        std::fs::write(&path, "").unwrap();
        assert!(Auth::new(Some(path.clone()), Vec::new(), None).is_err());
    }
}
