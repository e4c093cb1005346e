//! Splunk's HTTP Event Collector, so that agents with a stock HEC output
//! (Splunk forwarders' `httpout`, Vector `splunk_hec_logs`, Fluent Bit
//! `splunk`, the OpenTelemetry Collector's `splunk_hec` exporter) write to
//! chunkbus by changing a URL.
//!
//! - `POST /services/collector/event` (also `/services/collector` and
//!   `/services/collector/event/1.0`): a body of JSON event objects one
//!   after another (not an array). Each event is stored as one line, the
//!   object as written without insignificant whitespace, in the category
//!   named by its `index`, else `--hec-default-category`.
//! - `POST /services/collector/raw` (and `/raw/1.0`): each line of the body
//!   is stored as it is, in the category of `?index=`, else the default.
//! - `GET /services/collector/health`: HEC's health answer.
//!
//! Answers as HEC gives them: `{"text":"Success","code":0}`, and HEC's
//! codes on errors. As HEC does, the events before the first invalid one
//! are stored and the answer names the invalid one
//! (`invalid-event-number`): agents drop a batch answered 400, so what was
//! valid is kept.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::names::validate_category;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

use super::produce::{Batches, WriteOptions, check_writable, read_decoded, read_records, store};
use super::{ApiError, AppState, lines};

/// An answer in HEC's shape: `{"text":..,"code":..}`, and the number of
/// the first invalid event when there is one.
fn hec(status: StatusCode, code: u16, text: &str, invalid_event: Option<usize>) -> Response {
    let mut body = serde_json::json!({"text": text, "code": code});
    if let Some(n) = invalid_event {
        body["invalid-event-number"] = n.into();
    }
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.extensions_mut().insert(HecAnswer);
    resp
}

/// Marks an answer written in HEC's shape, which [`auth_answers`] leaves
/// as it is.
#[derive(Debug, Clone, Copy)]
struct HecAnswer;

fn success() -> Response {
    hec(StatusCode::OK, 0, "Success", None)
}

/// An [`ApiError`] as HEC would answer it: 503 "Server is busy" (code 9)
/// for what passes, otherwise its status with HEC's nearest code.
fn hec_error(e: ApiError) -> Response {
    let status = e.status();
    let (code, text) = match status.as_u16() {
        503 | 429 => (9, "Server is busy"),
        413 => (6, "Invalid data format"),
        408 => (6, "Invalid data format"),
        400..=499 => (6, "Invalid data format"),
        _ => (8, "Internal server error"),
    };
    let resp = hec(status, code, &format!("{text}: {e}"), None);
    e.with_headers_on(resp)
}

/// Turns the access check's 401 and 403 into HEC's answers (codes 2, 3
/// and 4), which Splunk agents read; everything else passes unchanged.
pub(super) async fn auth_answers(req: Request, next: axum::middleware::Next) -> Response {
    let had_token = req.headers().contains_key(header::AUTHORIZATION);
    auth_answer(had_token, next.run(req).await)
}

/// What [`auth_answers`] makes of `resp`, the answer to a request that
/// had an `Authorization` header or not.
pub(super) fn auth_answer(had_token: bool, resp: Response) -> Response {
    if resp.extensions().get::<HecAnswer>().is_some() {
        return resp;
    }
    match resp.status() {
        StatusCode::UNAUTHORIZED if !had_token => {
            hec(StatusCode::UNAUTHORIZED, 2, "Token is required", None)
        }
        StatusCode::UNAUTHORIZED => hec(StatusCode::UNAUTHORIZED, 3, "Invalid authorization", None),
        StatusCode::FORBIDDEN => hec(StatusCode::FORBIDDEN, 4, "Invalid token", None),
        _ => resp,
    }
}

/// `GET /services/collector/health`.
pub(super) async fn health() -> Response {
    hec(StatusCode::OK, 17, "HEC is healthy", None)
}

/// The query of the HEC routes: the native durability parameters, and
/// `index` for raw bodies. HEC's own (`channel`, `sourcetype`, `source`,
/// `host`) are accepted and ignored.
#[derive(Debug, Deserialize)]
pub(super) struct HecQuery {
    index: Option<String>,
    #[serde(flatten)]
    native: super::produce::ProduceQuery,
}

impl HecQuery {
    fn options(&self) -> Result<WriteOptions, ApiError> {
        self.native.options()
    }
}

/// Why an event body stops being read, with the event's number (from 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEvent {
    /// Its number, from 0.
    pub number: usize,
    /// HEC's code.
    pub code: u16,
    /// HEC's text.
    pub text: &'static str,
}

/// One event's category and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its `index`, else the default.
    pub category: String,
    /// The event object without insignificant whitespace.
    pub line: Vec<u8>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    index: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    event: Given<'a>,
}

/// A field as written, `null` included (an `Option` would take `null`
/// for a missing field); `None` when absent.
#[derive(Default)]
struct Given<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Given<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|raw| Given(Some(raw)))
    }
}

/// Parses a body of event objects (each read once) into `batches`, each
/// event's line in its category, until the first invalid one, whose
/// problem is returned (code 4 for a category `may_write` refuses). An
/// empty body is HEC's "No data".
pub fn parse_events_into(
    body: &[u8],
    default_category: &str,
    max_line: u64,
    may_write: &dyn Fn(&str) -> bool,
    batches: &mut Batches,
) -> Option<InvalidEvent> {
    let mut stream = serde_json::Deserializer::from_slice(body).into_iter::<Envelope>();
    let invalid = |number, code, text| Some(InvalidEvent { number, code, text });
    // One UTF-8 check of the whole body spares one per event.
    let all_utf8 = std::str::from_utf8(body).is_ok();
    // The last category checked and allowed (events mostly share one).
    let mut admitted: Option<String> = None;
    for number in 0.. {
        let start = stream.byte_offset();
        let envelope = match stream.next() {
            None if number == 0 => return invalid(0, 5, "No data"),
            None => return None,
            Some(Err(_)) => return invalid(number, 6, "Invalid data format"),
            Some(Ok(envelope)) => envelope,
        };
        let raw = body[start..stream.byte_offset()].trim_ascii_start();
        // An object (a derived struct would also take an array, its
        // fields by position), in UTF-8 (the fields skipped over, such as
        // `fields` or `host`, are not checked by the parse).
        if raw.first() != Some(&b'{') || (!all_utf8 && std::str::from_utf8(raw).is_err()) {
            return invalid(number, 6, "Invalid data format");
        }
        match envelope.event.0.map(RawValue::get) {
            None => return invalid(number, 12, "Event field is required"),
            Some("\"\"" | "null") => return invalid(number, 13, "Event field cannot be blank"),
            Some(_) => {}
        }
        let category = envelope.index.as_deref().unwrap_or(default_category);
        if admitted.as_deref() != Some(category) {
            if validate_category(category).is_err() {
                return invalid(number, 7, "Incorrect index");
            }
            if !may_write(category) {
                return invalid(number, 4, "Invalid token");
            }
            admitted = Some(category.to_owned());
        }
        if raw.len() as u64 <= max_line {
            // Never longer without its whitespace: written in place.
            batches.push_with(category, number, |buf| lines::minify_into(raw, buf));
        } else {
            let mut line = Vec::with_capacity(raw.len());
            lines::minify_into(raw, &mut line);
            if line.len() as u64 > max_line {
                return invalid(number, 6, "Invalid data format");
            }
            batches.push(category, &line, number);
        }
    }
    None
}

/// [`parse_events_into`] with every category allowed, as a list in request
/// order (tests, fuzzing).
pub fn parse_events(
    body: &[u8],
    default_category: &str,
    max_line: u64,
) -> (Vec<Event>, Option<InvalidEvent>) {
    let mut batches = Batches::default();
    let invalid = parse_events_into(body, default_category, max_line, &|_| true, &mut batches);
    let mut events: Vec<(usize, Event)> = batches
        .numbered_lines()
        .map(|(n, category, line)| {
            let event = Event {
                category: category.to_owned(),
                line: line.to_vec(),
            };
            (n, event)
        })
        .collect();
    events.sort_by_key(|(n, _)| *n);
    (events.into_iter().map(|(_, e)| e).collect(), invalid)
}

/// `POST /services/collector/event`.
pub(super) async fn event(
    State(st): State<Arc<AppState>>,
    query: Result<Query<HecQuery>, QueryRejection>,
    req: Request,
) -> Response {
    match store_events(&st, query, req).await {
        Ok(resp) | Err(resp) => resp,
    }
}

async fn store_events(
    st: &AppState,
    query: Result<Query<HecQuery>, QueryRejection>,
    req: Request,
) -> Result<Response, Response> {
    let Query(q) = query.map_err(|e| hec_error(e.into()))?;
    let opts = q.options().map_err(hec_error)?;
    check_writable(st, opts).map_err(hec_error)?;
    let (parts, body) = req.into_parts();
    let (raw, reservation) = read_records(st, &parts.headers, body)
        .await
        .map_err(hec_error)?;
    let default = st.ingest.hec_default_category.clone();
    let max_line = st.limits.max_line_bytes;
    let principal = parts.extensions.get::<crate::auth::Principal>().cloned();
    let (batches, invalid) = super::body::off_runtime_if_large(raw, "HEC parse", move |raw| {
        let may_write = |c: &str| principal.as_ref().is_none_or(|p| p.may_see(c));
        let mut batches = Batches::default();
        let invalid = parse_events_into(raw, &default, max_line, &may_write, &mut batches);
        (batches, invalid)
    })
    .await
    .map_err(hec_error)?;
    // Stored: the events before the first invalid one.
    store_all(st, batches, opts).await?;
    drop(reservation);
    match invalid {
        None => Ok(success()),
        Some(i) => {
            let status = match i.code {
                4 => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            Err(hec(status, i.code, i.text, Some(i.number)))
        }
    }
}

/// Appends every batch; the first failure is the answer (a `min_replicas`
/// timeout included: the lines are stored, but not copied as asked).
async fn store_all(st: &AppState, batches: Batches, opts: WriteOptions) -> Result<(), Response> {
    for result in batches.store(st, opts).await {
        result.written.map_err(hec_error)?;
    }
    Ok(())
}

/// `POST /services/collector/raw`.
pub(super) async fn raw(
    State(st): State<Arc<AppState>>,
    query: Result<Query<HecQuery>, QueryRejection>,
    req: Request,
) -> Response {
    let Ok(Query(q)) = query else {
        return hec(StatusCode::BAD_REQUEST, 6, "Invalid data format", None);
    };
    let category = q
        .index
        .clone()
        .unwrap_or_else(|| st.ingest.hec_default_category.clone());
    if validate_category(&category).is_err() {
        return hec(StatusCode::BAD_REQUEST, 7, "Incorrect index", None);
    }
    if let Some(p) = req.extensions().get::<crate::auth::Principal>()
        && !p.may_see(&category)
    {
        return hec(StatusCode::FORBIDDEN, 4, "Invalid token", None);
    }
    let result = async {
        let opts = q.options()?;
        check_writable(&st, opts)?;
        let (parts, body) = req.into_parts();
        let (mut data, reservation) = read_decoded(&st, &parts.headers, body).await?;
        let count = lines::finish_lines(&mut data, st.limits.max_line_bytes)?;
        if count == 0 {
            return Ok(None);
        }
        store(&st, &category, data, count, reservation, opts)
            .await
            .map(Some)
    }
    .await;
    match result {
        Ok(Some(_)) => success(),
        Ok(None) => hec(StatusCode::BAD_REQUEST, 5, "No data", None),
        Err(e) => hec_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| format!("{} {}", e.category, String::from_utf8_lossy(&e.line)))
            .collect()
    }

    #[test]
    fn events_one_after_another_become_lines() {
        let body = br#"{"event": "hello", "time": 1700000000.5}
            {"event": {"msg": "a b", "n": 1}, "index": "web", "fields": {"k": "v"}}{"event":"x","sourcetype":"s"}"#;
        let (events, invalid) = parse_events(body, "hec", 1 << 20);
        assert_eq!(invalid, None);
        assert_eq!(
            lines(&events),
            [
                r#"hec {"event":"hello","time":1700000000.5}"#,
                r#"web {"event":{"msg":"a b","n":1},"index":"web","fields":{"k":"v"}}"#,
                r#"hec {"event":"x","sourcetype":"s"}"#,
            ]
        );
    }

    #[test]
    fn the_first_invalid_event_stops_the_body_with_its_number_and_code() {
        let ok = r#"{"event":"ok"}"#;
        for (bad, code) in [
            (r#"{"time":1}"#, 12),
            (r#"{"event":""}"#, 13),
            (r#"{"event":null}"#, 13),
            (r#"{"event":"x","index":"no/slash"}"#, 7),
            (r#"{"event":"x","index":""}"#, 7),
            (r#"{"event":"x""#, 6),
            (r#"[1,2]"#, 6),
            (r#"["web",{"a":1}]"#, 6),
            (r#""text""#, 6),
            (r#"{"event":"x","index":5}"#, 6),
        ] {
            let body = format!("{ok}{ok}{bad}{ok}");
            let (events, invalid) = parse_events(body.as_bytes(), "hec", 1 << 20);
            assert_eq!(events.len(), 2, "{bad}");
            let invalid = invalid.unwrap();
            assert_eq!((invalid.number, invalid.code), (2, code), "{bad}");
        }
        assert_eq!(parse_events(b"  ", "hec", 10).1.unwrap().code, 5);
        // Not UTF-8 in a field the parse skips over: refused, not stored.
        let (events, invalid) = parse_events(
            b"{\"event\":\"ok\"}{\"event\":\"x\",\"host\":\"\xff\"}",
            "hec",
            1 << 20,
        );
        assert_eq!(events.len(), 1);
        assert_eq!(invalid.map(|i| (i.number, i.code)), Some((1, 6)));
        let long = parse_events(br#"{"event":"0123456789"}"#, "hec", 10);
        assert_eq!(long.1.unwrap().code, 6);
    }

    #[test]
    fn each_change_of_category_is_checked_against_the_token() {
        let body = br#"{"event":1,"index":"open"}{"event":2,"index":"open"}{"event":3}{"event":4,"index":"open"}{"event":5,"index":"shut"}{"event":6,"index":"open"}"#;
        let asked = std::cell::RefCell::new(Vec::new());
        let may_write = |c: &str| {
            asked.borrow_mut().push(c.to_owned());
            c != "shut"
        };
        let mut batches = Batches::default();
        let invalid = parse_events_into(body, "hec", 1 << 20, &may_write, &mut batches);
        assert_eq!(invalid.map(|i| (i.number, i.code)), Some((4, 4)));
        assert_eq!(
            batches.lines().map(|(c, _)| c).collect::<Vec<_>>(),
            ["open", "open", "open", "hec"]
        );
        assert_eq!(asked.into_inner(), ["open", "hec", "open", "shut"]);
    }
}
