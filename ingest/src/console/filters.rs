//! The Activity page's URL parameters (SPEC §13), read and written: `state` (repeatable),
//! `pc`, `manifest`, `exec`, `after` and `before` (RFC 3339, or a span such as `1h`, `24h`,
//! `7d` meaning that long ago), `page` (the keyset token of the Activity API). People share these
//! URLs, so one canonical form is written back: the filter form's empty fields are dropped, the
//! parameters come in one order.

use chrono::{DateTime, Utc};

use crate::store::{Cursor, RunState};

/// A time bound: an instant, or a span before now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeBound {
    At(DateTime<Utc>),
    /// As written (`1h`), and how long that is.
    Ago(String, chrono::Duration),
}

impl TimeBound {
    fn parse(name: &str, text: &str) -> Result<TimeBound, String> {
        if let Ok(at) = DateTime::parse_from_rfc3339(text) {
            return Ok(TimeBound::At(at.with_timezone(&Utc)));
        }
        humantime::parse_duration(text)
            .ok()
            .and_then(|d| chrono::Duration::from_std(d).ok())
            // Any later `now` minus the span must stay a time: a span up to 1000 years.
            .filter(|d| *d <= chrono::Duration::days(366_000))
            .map(|d| TimeBound::Ago(text.to_string(), d))
            .ok_or_else(|| {
                format!(
                    "{name}={text:?} is neither an RFC 3339 time (2025-07-01T09:00:00Z) nor a \
                     span before now (1h, 24h, 7d)"
                )
            })
    }

    /// The instant it means at `now`.
    pub fn at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            TimeBound::At(at) => *at,
            TimeBound::Ago(_, span) => now - *span,
        }
    }

    /// As it goes in a URL.
    pub fn text(&self) -> String {
        match self {
            TimeBound::At(at) => at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            TimeBound::Ago(text, _) => text.clone(),
        }
    }
}

/// What the Activity page shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub states: Vec<RunState>,
    pub pc: Option<String>,
    pub manifest: Option<String>,
    pub exec: Option<String>,
    pub after: Option<TimeBound>,
    pub before: Option<TimeBound>,
    pub page: Option<Cursor>,
}

/// The names `state` takes, in the order the form shows them.
pub const STATE_NAMES: [&str; 9] = [
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "killed",
    "spawn_failed",
    "interrupted",
    "cancelled",
    "lost",
];

fn once(slot: &mut Option<String>, name: &str, value: String) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{name} may be given once"));
    }
    *slot = Some(value);
    Ok(())
}

impl Filters {
    /// Reads a query string; errors say which parameter is wrong and what it takes. Empty
    /// values count as absent.
    pub fn parse(query: &str) -> Result<Filters, String> {
        let mut f = Filters::default();
        let (mut after, mut before, mut page) = (None, None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.trim().to_string();
            if value.is_empty() {
                continue;
            }
            match key.as_ref() {
                "state" => {
                    let state = RunState::from_name(&value).ok_or_else(|| {
                        format!(
                            "state={value:?} is not a state: use one of {}",
                            STATE_NAMES.join(", ")
                        )
                    })?;
                    if !f.states.contains(&state) {
                        f.states.push(state);
                    }
                }
                "pc" => once(&mut f.pc, "pc", value)?,
                "manifest" => once(&mut f.manifest, "manifest", value)?,
                "exec" => once(&mut f.exec, "exec", value)?,
                "after" => once(&mut after, "after", value)?,
                "before" => once(&mut before, "before", value)?,
                "page" => once(&mut page, "page", value)?,
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: the Activity page takes state, pc, \
                         manifest, exec, after, before and page"
                    ));
                }
            }
        }
        f.states
            .sort_by_key(|s| STATE_NAMES.iter().position(|n| *n == s.as_str()));
        f.after = after.map(|t| TimeBound::parse("after", &t)).transpose()?;
        f.before = before.map(|t| TimeBound::parse("before", &t)).transpose()?;
        f.page = page
            .map(|t| {
                Cursor::from_token(&t).ok_or_else(|| {
                    "page is not a token this console made: follow the \"older\" link".to_string()
                })
            })
            .transpose()?;
        Ok(f)
    }

    /// The canonical query string (without `?`).
    pub fn to_query(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for state in &self.states {
            out.append_pair("state", state.as_str());
        }
        for (name, value) in [
            ("pc", &self.pc),
            ("manifest", &self.manifest),
            ("exec", &self.exec),
        ] {
            if let Some(v) = value {
                out.append_pair(name, v);
            }
        }
        for (name, bound) in [("after", &self.after), ("before", &self.before)] {
            if let Some(b) = bound {
                out.append_pair(name, &b.text());
            }
        }
        if let Some(page) = self.page {
            out.append_pair("page", &page.to_token());
        }
        out.finish()
    }

    /// The URL of the next (older) page.
    pub fn older(&self, cursor: Cursor) -> String {
        let next = Filters {
            page: Some(cursor),
            ..self.clone()
        };
        format!("/?{}", next.to_query())
    }

    /// Whether anything narrows the view.
    pub fn is_empty(&self) -> bool {
        Filters {
            page: None,
            ..self.clone()
        } == Filters::default()
    }
}

/// What the endpoints page shows (`/endpoints`): `prefix` (of pc_id), `connected` (`yes` or
/// `no`), `page` (the last pc_id of the previous page, as the Activity API's token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointFilters {
    pub prefix: Option<String>,
    pub connected: Option<bool>,
    pub page: Option<String>,
}

impl EndpointFilters {
    /// Reads a query string; errors say which parameter is wrong and what it takes.
    pub fn parse(query: &str) -> Result<EndpointFilters, String> {
        let mut f = EndpointFilters::default();
        let mut connected = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.trim().to_string();
            if value.is_empty() {
                continue;
            }
            match key.as_ref() {
                "prefix" => once(&mut f.prefix, "prefix", value)?,
                "connected" => once(&mut connected, "connected", value)?,
                "page" => once(&mut f.page, "page", value)?,
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: the endpoints page takes prefix, connected \
                         and page"
                    ));
                }
            }
        }
        f.connected = match connected.as_deref() {
            None => None,
            Some("yes") => Some(true),
            Some("no") => Some(false),
            Some(other) => return Err(format!("connected={other:?}: use yes or no")),
        };
        Ok(f)
    }

    /// The canonical query string (without `?`).
    pub fn to_query(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        if let Some(prefix) = &self.prefix {
            out.append_pair("prefix", prefix);
        }
        if let Some(connected) = self.connected {
            out.append_pair("connected", if connected { "yes" } else { "no" });
        }
        if let Some(page) = &self.page {
            out.append_pair("page", page);
        }
        out.finish()
    }

    /// The URL of the page after `last_pc_id`.
    pub fn next(&self, last_pc_id: &str) -> String {
        let next = EndpointFilters {
            page: Some(last_pc_id.to_string()),
            ..self.clone()
        };
        format!("/endpoints?{}", next.to_query())
    }

    /// Whether anything narrows the view (paging aside).
    pub fn is_empty(&self) -> bool {
        self.prefix.is_none() && self.connected.is_none()
    }
}

#[cfg(test)]
mod tests {
    use kanade_shared::wire::ExecStatus;

    use super::*;

    #[test]
    fn the_form_s_empty_fields_drop_out_and_the_rest_comes_back_in_one_order() {
        let f = Filters::parse("pc=&state=lost&manifest=inventory&state=failed&exec=&after=1h")
            .unwrap();
        assert_eq!(
            f.states,
            vec![RunState::Finished(ExecStatus::Failed), RunState::Lost]
        );
        assert_eq!(
            f.to_query(),
            "state=failed&state=lost&manifest=inventory&after=1h"
        );
        assert_eq!(Filters::parse(&f.to_query()).unwrap(), f);
    }

    #[test]
    fn times_are_rfc3339_or_a_span_before_now() {
        let f = Filters::parse("after=2025-07-01T09:00:00Z&before=30m").unwrap();
        let now = DateTime::parse_from_rfc3339("2025-07-02T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            f.after.unwrap().at(now).to_rfc3339(),
            "2025-07-01T09:00:00+00:00"
        );
        assert_eq!(
            f.before.unwrap().at(now).to_rfc3339(),
            "2025-07-01T23:30:00+00:00"
        );
        assert!(
            Filters::parse("after=1000000y").is_err(),
            "a span no time is that long ago"
        );
        let err = Filters::parse("after=yesterday").unwrap_err();
        assert!(
            err.contains("after=\"yesterday\"") && err.contains("RFC 3339"),
            "{err}"
        );
    }

    #[test]
    fn wrong_parameters_say_what_is_accepted() {
        assert!(
            Filters::parse("state=bogus")
                .unwrap_err()
                .contains("running, succeeded")
        );
        assert!(
            Filters::parse("colour=red")
                .unwrap_err()
                .contains("takes state, pc")
        );
        assert!(Filters::parse("pc=a&pc=b").unwrap_err().contains("once"));
        assert!(Filters::parse("page=zz").unwrap_err().contains("older"));
    }

    #[test]
    fn endpoint_filters_read_and_write_one_canonical_url() {
        let f = EndpointFilters::parse("connected=no&prefix=web%20&page=").unwrap();
        assert_eq!(f.connected, Some(false));
        assert_eq!(
            f.to_query(),
            "prefix=web&connected=no",
            "values are trimmed"
        );
        assert_eq!(EndpointFilters::parse(&f.to_query()).unwrap(), f);
        assert!(
            EndpointFilters::parse("connected=maybe")
                .unwrap_err()
                .contains("yes or no")
        );
        assert!(
            EndpointFilters::parse("state=x")
                .unwrap_err()
                .contains("prefix")
        );
    }

    #[test]
    fn values_are_encoded_in_urls() {
        let f = Filters::parse("pc=a%26b%3Dc%20d").unwrap();
        assert_eq!(f.pc.as_deref(), Some("a&b=c d"));
        assert_eq!(f.to_query(), "pc=a%26b%3Dc+d");
    }
}
