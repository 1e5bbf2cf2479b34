//! Sign-in (SPEC §13). With a tokens file every page needs a session: `/signin` takes a reader
//! or operator token, checks it against the tokens file and sets a cookie holding a random
//! session id (never the token). The store keeps only the id's SHA-256, the token's SHA-256 (a
//! session ends when its token leaves the tokens file, and its role is the file's) and the
//! expiry, so any replica honours it. Forms that change anything carry a CSRF token and must come
//! from the console's own origin: the session's, or, without tokens (where anyone reaching the
//! console may act), a random one kept in a `SameSite=Strict` cookie that the form must repeat,
//! which another site can neither read nor make the browser send.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
};
use chrono::Utc;

use super::{Console, PageError, pages};
use crate::{
    auth::{HeldToken, Identity, Tokens, sha256_hex},
    store::{ConsoleSession, Store},
};

/// The session cookie's name.
pub const COOKIE: &str = "kanade_session";
/// Without tokens: the cookie holding the CSRF token forms repeat.
pub const CSRF_COOKIE: &str = "kanade_csrf";

/// Who is looking, as every page learns it.
#[derive(Debug, Clone)]
pub struct Visitor {
    /// The token forms that change anything must carry.
    pub csrf: String,
    /// Signed in with a token: there is a session to sign out of.
    pub signed_in: bool,
    /// May act (cancel runs): an operator, or anyone when the console runs without tokens.
    pub may_act: bool,
    /// The token the session was signed in with: live updates end when it is withdrawn.
    pub held: Option<HeldToken>,
    /// Who their actions are recorded under.
    pub name: String,
}

impl Visitor {
    /// Whether a form came from the console's own page: its origin, and the CSRF token it
    /// carries.
    pub fn sent(&self, headers: &HeaderMap, form_csrf: Option<&str>) -> bool {
        same_origin(headers) && form_csrf.is_some_and(|c| same_secret(c, &self.csrf))
    }
}

pub struct Sessions {
    store: Arc<dyn Store>,
    tokens: Arc<Tokens>,
    ttl: Duration,
    /// Served over TLS: the cookie is `Secure`.
    secure: bool,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system's randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn cookie_value(headers: &HeaderMap, cookie: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie)
        .map(|(_, value)| value.to_string())
}

/// A cookie's `Set-Cookie` value: HttpOnly, SameSite=Strict, `Secure` under TLS.
fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    ))
    .expect("a cookie of hex digits")
}

/// A `next=` target that stays on this console (no open redirect): a path of printable ASCII
/// (browsers drop tabs and newlines from URLs, which would turn `/\t/evil` into `//evil`), not
/// `//…` and without backslashes (which browsers read as slashes).
fn local_path(next: &str) -> &str {
    let bytes = next.as_bytes();
    let local = bytes.first() == Some(&b'/')
        && !matches!(bytes.get(1), Some(b'/' | b'\\'))
        && bytes.iter().all(|&b| b.is_ascii_graphic() && b != b'\\');
    if local { next } else { "/" }
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

impl Sessions {
    pub fn new(store: Arc<dyn Store>, tokens: Arc<Tokens>, ttl: Duration, secure: bool) -> Self {
        Sessions {
            store,
            tokens,
            ttl,
            secure,
        }
    }

    /// The visitor's live session, if any, as a [`Visitor`].
    async fn current(&self, headers: &HeaderMap) -> Result<Option<Visitor>, PageError> {
        let Some(id) = cookie_value(headers, COOKIE) else {
            return Ok(None);
        };
        let Some(session) = self.store.session(&sha256_hex(&id), Utc::now()).await? else {
            return Ok(None);
        };
        // A token removed from the tokens file (or no longer a person's) ends its sessions; its
        // role is what the file says now.
        Ok(self
            .tokens
            .by_sha256(&session.token_sha256)
            .filter(|identity| identity.may_read())
            .map(|identity| Visitor {
                csrf: session.csrf,
                signed_in: true,
                may_act: identity.may_act(),
                name: identity.name().to_string(),
                held: Some(self.tokens.hold(session.token_sha256, identity)),
            }))
    }

    fn cookie(&self, value: &str, max_age: Duration) -> HeaderValue {
        set_cookie(COOKIE, value, max_age, self.secure)
    }
}

/// Refuses a POST whose `Origin` (sent by every current browser) is not this console.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    host.is_some() && origin_host == host
}

/// How long the CSRF cookie of a console without tokens lasts.
const CSRF_COOKIE_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Without tokens, everyone may look and act: the [`Visitor`] carries the CSRF token of the
/// browser's cookie, or a new one the response sets.
async fn anyone(console: &Console, mut request: Request, next: Next) -> Response {
    let existing = cookie_value(request.headers(), CSRF_COOKIE)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()));
    let csrf = existing.clone().unwrap_or_else(random_hex);
    request.extensions_mut().insert(Visitor {
        csrf: csrf.clone(),
        signed_in: false,
        may_act: true,
        name: crate::auth::ANONYMOUS.to_string(),
        held: None,
    });
    let mut response = next.run(request).await;
    if existing.is_none() {
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(
                CSRF_COOKIE,
                &csrf,
                CSRF_COOKIE_AGE,
                console.inner.config.tls,
            ),
        );
    }
    response
}

/// Middleware of every page but `/signin` and the assets: who is looking ([`Visitor`]), and a
/// sign-in for whoever is not signed in when tokens are required.
pub async fn require_sign_in(
    State(console): State<Console>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(sessions) = &console.inner.sessions else {
        return anyone(&console, request, next).await;
    };
    match sessions.current(request.headers()).await {
        Ok(Some(visitor)) => {
            request.extensions_mut().insert(visitor);
            next.run(request).await
        }
        Ok(None) if request.method() == Method::GET && request.uri().path() != "/events" => {
            let target = request
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            // A link followed from another site (chat, mail) arrives without the SameSite=Strict
            // cookie even when the person is signed in: load the same URL once more from here,
            // a same-site navigation that carries it.
            let cross_site = request
                .headers()
                .get("sec-fetch-site")
                .is_some_and(|v| v.as_bytes() == b"cross-site");
            if cross_site {
                return pages::same_site_reload(local_path(target)).into_response();
            }
            let next: String = form_urlencoded::byte_serialize(target.as_bytes()).collect();
            Redirect::to(&format!("/signin?next={next}")).into_response()
        }
        Ok(None) => (
            StatusCode::UNAUTHORIZED,
            "sign in first: /signin takes a reader or operator token\n",
        )
            .into_response(),
        Err(err) => err.into_response(),
    }
}

/// `GET /signin`.
pub async fn sign_in_page(
    State(console): State<Console>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let next = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "next")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| "/".into());
    if console.inner.sessions.is_none() {
        return Redirect::to(local_path(&next)).into_response();
    }
    pages::sign_in(local_path(&next), None).into_response()
}

/// `POST /signin`: `token`, `next`.
pub async fn sign_in(State(console): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(sessions) = &console.inner.sessions else {
        return Redirect::to("/").into_response();
    };
    if !same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            pages::error("Refused", "a form from another site"),
        )
            .into_response();
    }
    let (mut token, mut next) = (String::new(), String::from("/"));
    for (key, value) in form_urlencoded::parse(&body) {
        match key.as_ref() {
            "token" => token = value.trim().to_string(),
            "next" => next = value.into_owned(),
            _ => {}
        }
    }
    let next = local_path(&next).to_string();
    let refused = |status: StatusCode, message: &str| {
        (status, pages::sign_in(&next, Some(message))).into_response()
    };
    match sessions.tokens.identify(&token) {
        Some(identity) if identity.may_read() => {}
        Some(Identity::Agent { pc_id }) => {
            return refused(
                StatusCode::FORBIDDEN,
                &format!(
                    "that is an endpoint's token (pc_id {pc_id:?}): it may only write its own \
                     runs. The console needs a reader token (kanade-ingest token add --reader), \
                     or an operator token to cancel runs too (--operator)."
                ),
            );
        }
        _ => {
            return refused(
                StatusCode::UNAUTHORIZED,
                "not a token of this ingest's tokens file; the console needs a reader token \
                 (kanade-ingest token add --reader), or an operator token to cancel runs too \
                 (--operator)",
            );
        }
    }
    let id = random_hex();
    let session = ConsoleSession {
        id_sha256: sha256_hex(&id),
        token_sha256: sha256_hex(&token),
        csrf: random_hex(),
        expires_at: Utc::now()
            + chrono::Duration::from_std(sessions.ttl).unwrap_or(chrono::Duration::hours(12)),
    };
    if let Err(err) = sessions.store.open_session(&session).await {
        return PageError::from(err).into_response();
    }
    // Signing in again replaces the browser's previous session rather than leaving it open.
    if let Some(previous) = cookie_value(&headers, COOKIE)
        && let Err(err) = sessions.store.end_session(&sha256_hex(&previous)).await
    {
        tracing::warn!(error = %err, "console: ending the previous session failed; it expires on its own");
    }
    let mut response = Redirect::to(&next).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, sessions.cookie(&id, sessions.ttl));
    response
}

/// `GET /signout` (a typed or bookmarked URL): the button, since signing out is a POST.
pub async fn sign_out_page(axum::Extension(visitor): axum::Extension<Visitor>) -> Response {
    if visitor.signed_in {
        pages::sign_out(&visitor).into_response()
    } else {
        Redirect::to("/").into_response()
    }
}

/// The answer to a form whose CSRF token or origin is not the console's.
pub fn refused_form() -> Response {
    (
        StatusCode::FORBIDDEN,
        pages::error(
            "Refused",
            "the form's CSRF token does not match this browser's; reload the page and try again",
        ),
    )
        .into_response()
}

/// A form field's value.
pub fn form_field(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `POST /signout` (with the session's `csrf`).
pub async fn sign_out(
    State(console): State<Console>,
    axum::Extension(visitor): axum::Extension<Visitor>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(sessions) = &console.inner.sessions else {
        return Redirect::to("/").into_response();
    };
    if !visitor.sent(&headers, form_field(&body, "csrf").as_deref()) {
        return refused_form();
    }
    if let Some(id) = cookie_value(&headers, COOKIE)
        && let Err(err) = sessions.store.end_session(&sha256_hex(&id)).await
    {
        return PageError::from(err).into_response();
    }
    let mut response = Redirect::to("/signin").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, sessions.cookie("", Duration::ZERO));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_never_leaves_the_console() {
        assert_eq!(local_path("/runs/x?y=1"), "/runs/x?y=1");
        for outside in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "evil",
            "/\t/evil.example",
            "/\n/evil.example",
            "/ /evil",
        ] {
            assert_eq!(local_path(outside), "/", "{outside}");
        }
    }

    #[test]
    fn a_form_from_another_origin_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(
            same_origin(&headers),
            "no Origin: not a cross-site browser form"
        );
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&headers));
    }
}
