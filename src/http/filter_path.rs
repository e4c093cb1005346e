//! Elasticsearch's `filter_path`: the parts of an answer a client asks
//! for. Filebeat, Logstash, Elastic Agent and the OpenTelemetry
//! Collector's Elasticsearch exporter send one with every bulk request
//! (`errors,items.*.error,items.*.status` for the first three): without it
//! a bulk answer is about twice the size of the request it answers.
//!
//! Rules, as Elasticsearch documents them:
//! - paths are separated by commas, a path's fields by dots; a field of a
//!   path may hold `*` wildcards (`items.*.status`), and `**` stands for
//!   any number of fields (`**.status`);
//! - arrays take no field of a path: `items.*.status` reaches the
//!   `status` of every element of `items`;
//! - a field a path names whole is kept whole; an object or array left
//!   empty by the filter is dropped (so is an element of an array), a
//!   value a path goes through but does not end at is dropped; nothing
//!   left is `{}`;
//! - a path that starts with `-` excludes what it names; with both kinds,
//!   a field is kept when an including path keeps it and no excluding
//!   path names it.
//!
//! Only successful answers are filtered: errors are answered whole, as
//! Elasticsearch does, so a client never loses the reason of a refusal.

use serde_json::{Map, Value};

/// A compiled `filter_path`.
#[derive(Debug, Clone)]
pub struct FilterPath {
    include: Vec<Vec<Field>>,
    exclude: Vec<Vec<Field>>,
}

/// One field of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    /// `**`: any number of fields, none included (`a.**` is `a` whole).
    Any,
    /// A name, with `*` matching any run of characters.
    Glob(String),
}

/// Where the filter stands at one object of an answer: the positions
/// reached in the including and the excluding paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    /// `None`: everything below is included (no including paths, or one
    /// was completed above).
    include: Option<Vec<(u16, u16)>>,
    exclude: Vec<(u16, u16)>,
}

/// What becomes of one member of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// Left out.
    Drop,
    /// Kept whole.
    Keep,
    /// Kept as far as what is below it is kept.
    Descend(At),
}

/// Most paths in one `filter_path`, and fields in one path: a filter is
/// a few short paths, and these bound the work a hostile one asks for at
/// each member of an answer.
pub const MAX_PATHS: usize = 32;
pub const MAX_FIELDS: usize = 16;
/// Longest `filter_path` (agents send 40 to 120 bytes): with the bounds
/// above, it bounds the cost of matching one member of an answer.
pub const MAX_BYTES: usize = 1024;

impl FilterPath {
    /// The filter `s` asks for; `None` when it names no path (an empty
    /// `filter_path` filters nothing); an error for one beyond
    /// [`MAX_BYTES`], [`MAX_PATHS`] or [`MAX_FIELDS`].
    pub fn parse(s: &str) -> Result<Option<FilterPath>, String> {
        let mut f = FilterPath {
            include: Vec::new(),
            exclude: Vec::new(),
        };
        if s.len() > MAX_BYTES {
            return Err(format!("filter_path is longer than {MAX_BYTES} bytes"));
        }
        if s.split(',').count() > MAX_PATHS {
            return Err(format!("filter_path names more than {MAX_PATHS} paths"));
        }
        for path in s.split(',').map(str::trim) {
            let (list, path) = match path.strip_prefix('-') {
                Some(p) => (&mut f.exclude, p),
                None => (&mut f.include, path),
            };
            if path.is_empty() {
                continue;
            }
            if path.split('.').count() > MAX_FIELDS {
                return Err(format!(
                    "filter_path has a path of more than {MAX_FIELDS} fields"
                ));
            }
            let mut fields: Vec<Field> = Vec::new();
            for name in path.split('.') {
                let field = match name {
                    "**" => Field::Any,
                    _ => Field::Glob(name.to_owned()),
                };
                // `a.**.**.b` is `a.**.b`.
                if field == Field::Any && fields.last() == Some(&Field::Any) {
                    continue;
                }
                fields.push(field);
            }
            list.push(fields);
        }
        Ok((!f.include.is_empty() || !f.exclude.is_empty()).then_some(f))
    }

    /// Where the filter stands at the top of an answer.
    pub fn root(&self) -> At {
        let start = |paths: &[Vec<Field>]| {
            let mut set = Vec::new();
            for p in 0..paths.len() {
                close(paths, &mut set, (p as u16, 0));
            }
            set
        };
        At {
            include: (!self.include.is_empty()).then(|| start(&self.include)),
            exclude: start(&self.exclude),
        }
    }

    /// What becomes of the member `key` of an object at `at`.
    pub fn member(&self, at: &At, key: &str) -> Member {
        let (exclude, excluded) = step(&self.exclude, &at.exclude, key);
        if excluded {
            return Member::Drop;
        }
        let include = match &at.include {
            None => None,
            Some(set) => match step(&self.include, set, key) {
                (_, true) => None,
                (next, false) if next.is_empty() => return Member::Drop,
                (next, false) => Some(next),
            },
        };
        if include.is_none() && exclude.is_empty() {
            Member::Keep
        } else {
            Member::Descend(At { include, exclude })
        }
    }

    /// Whether the member `key` of an object at `at`, a number, string or
    /// boolean, is kept.
    pub fn keeps_scalar(&self, at: &At, key: &str) -> bool {
        match self.member(at, key) {
            Member::Drop => false,
            Member::Keep => true,
            Member::Descend(below) => below.include.is_none(),
        }
    }

    /// `v`, standing at `at`, as the filter keeps it; `None` when nothing
    /// of it is kept.
    pub fn value(&self, at: &At, v: &Value) -> Option<Value> {
        match v {
            Value::Object(members) => {
                let mut kept = Map::new();
                for (key, x) in members {
                    let x = match self.member(at, key) {
                        Member::Drop => continue,
                        Member::Keep => x.clone(),
                        Member::Descend(below) => match self.value(&below, x) {
                            Some(x) => x,
                            None => continue,
                        },
                    };
                    kept.insert(key.clone(), x);
                }
                (!kept.is_empty()).then_some(Value::Object(kept))
            }
            Value::Array(xs) => {
                let kept: Vec<Value> = xs.iter().filter_map(|x| self.value(at, x)).collect();
                (!kept.is_empty()).then_some(Value::Array(kept))
            }
            scalar => at.include.is_none().then(|| scalar.clone()),
        }
    }

    /// A whole answer as the filter keeps it (`{}` when nothing is).
    pub fn answer(&self, v: &Value) -> Value {
        self.value(&self.root(), v)
            .unwrap_or_else(|| Value::Object(Map::new()))
    }
}

/// Adds `pos` to `set`, and what `**` matching no field reaches from it.
fn close(paths: &[Vec<Field>], set: &mut Vec<(u16, u16)>, pos: (u16, u16)) {
    if set.contains(&pos) {
        return;
    }
    set.push(pos);
    let (p, i) = pos;
    if paths[p as usize].get(i as usize) == Some(&Field::Any) {
        close(paths, set, (p, i + 1));
    }
}

/// The positions reached from `set` by a member named `key`, and whether
/// some path ends at it.
fn step(paths: &[Vec<Field>], set: &[(u16, u16)], key: &str) -> (Vec<(u16, u16)>, bool) {
    let mut next = Vec::new();
    for &(p, i) in set {
        match paths[p as usize].get(i as usize) {
            // `**` takes this field and may take more.
            Some(Field::Any) => close(paths, &mut next, (p, i)),
            Some(Field::Glob(g)) if glob(g.as_bytes(), key.as_bytes()) => {
                close(paths, &mut next, (p, i + 1))
            }
            _ => {}
        }
    }
    let ended = next
        .iter()
        .any(|&(p, i)| i as usize == paths[p as usize].len());
    (next, ended)
}

/// Whether `name` matches `pattern`, where `*` matches any run of bytes
/// (none included). Linear in practice: a star remembers where to resume.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filtered(filter: &str, v: Value) -> Value {
        FilterPath::parse(filter).unwrap().unwrap().answer(&v)
    }

    fn bulk_answer() -> Value {
        json!({
            "took": 3,
            "errors": true,
            "items": [
                {"index": {"_index": "a", "_id": "c@1", "_version": 1, "result": "created",
                    "_shards": {"total": 1, "successful": 1, "failed": 0},
                    "_seq_no": 1, "_primary_term": 1, "status": 201}},
                {"create": {"_index": "b", "_id": "x", "status": 409,
                    "error": {"type": "version_conflict_engine_exception", "reason": "exists"}}},
            ]
        })
    }

    #[test]
    fn globs_match_runs_of_characters() {
        for (p, n, want) in [
            ("*", "", true),
            ("*", "status", true),
            ("status", "status", true),
            ("status", "statuses", false),
            ("stat*", "status", true),
            ("*tus", "status", true),
            ("s*t*s", "status", true),
            ("s*x*s", "status", false),
            ("_*", "_id", true),
            ("_*", "id", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("", "", true),
            ("", "a", false),
        ] {
            assert_eq!(glob(p.as_bytes(), n.as_bytes()), want, "{p:?} on {n:?}");
        }
    }

    #[test]
    fn the_agents_filters_keep_status_and_errors() {
        // Filebeat's, Logstash's and Elastic Agent's.
        assert_eq!(
            filtered("errors,items.*.error,items.*.status", bulk_answer()),
            json!({"errors": true, "items": [
                {"index": {"status": 201}},
                {"create": {"status": 409,
                    "error": {"type": "version_conflict_engine_exception", "reason": "exists"}}},
            ]})
        );
        // The OpenTelemetry Collector's exporter's: parts of `error`.
        assert_eq!(
            filtered(
                "items.*._index,items.*.status,items.*.failure_store,items.*.error.type,items.*.error.reason",
                bulk_answer()
            ),
            json!({"items": [
                {"index": {"_index": "a", "status": 201}},
                {"create": {"_index": "b", "status": 409,
                    "error": {"type": "version_conflict_engine_exception", "reason": "exists"}}},
            ]})
        );
    }

    #[test]
    fn what_is_left_empty_is_dropped() {
        // Elements of `items` without an error leave the array.
        assert_eq!(
            filtered("items.*.error", bulk_answer()),
            json!({"items": [
                {"create": {"error": {"type": "version_conflict_engine_exception", "reason": "exists"}}},
            ]})
        );
        // A successful bulk filtered to its errors is `{}` but `errors`.
        let mut ok = bulk_answer();
        ok["items"].as_array_mut().unwrap().pop();
        ok["errors"] = json!(false);
        assert_eq!(
            filtered("errors,items.*.error", ok.clone()),
            json!({"errors": false})
        );
        assert_eq!(filtered("nothing.here", ok.clone()), json!({}));
        // A path through a number keeps nothing of it.
        assert_eq!(filtered("took.ms", ok), json!({}));
    }

    #[test]
    fn a_named_object_is_kept_whole() {
        assert_eq!(
            filtered("items.index._shards", bulk_answer()),
            json!({"items": [{"index": {"_shards": {"total": 1, "successful": 1, "failed": 0}}}]})
        );
        assert_eq!(filtered("took,took.x", bulk_answer()), json!({"took": 3}));
    }

    #[test]
    fn two_stars_stand_for_any_number_of_fields() {
        assert_eq!(
            filtered("**.type", bulk_answer()),
            json!({"items": [{"create": {"error": {"type": "version_conflict_engine_exception"}}}]})
        );
        assert_eq!(
            filtered("items.**.failed", bulk_answer()),
            json!({"items": [{"index": {"_shards": {"failed": 0}}}]})
        );
        assert_eq!(filtered("**", bulk_answer()), bulk_answer());
        // None of them: `took.**` is `took`.
        assert_eq!(filtered("took.**", bulk_answer()), json!({"took": 3}));
    }

    #[test]
    fn excluding_paths_remove_what_they_name() {
        let mut want = bulk_answer();
        for item in want["items"].as_array_mut().unwrap() {
            for (_, body) in item.as_object_mut().unwrap() {
                body.as_object_mut().unwrap().remove("_index");
            }
        }
        assert_eq!(filtered("-items.*._index", bulk_answer()), want);
        // With including paths: kept when included and not excluded.
        assert_eq!(
            filtered("items.*.error,-items.*.error.reason", bulk_answer()),
            json!({"items": [{"create": {"error": {"type": "version_conflict_engine_exception"}}}]})
        );
        assert_eq!(filtered("took,-took", bulk_answer()), json!({}));
    }

    #[test]
    fn empty_filters_filter_nothing() {
        assert!(FilterPath::parse("").unwrap().is_none());
        assert!(FilterPath::parse(" , ,").unwrap().is_none());
        assert!(FilterPath::parse("-").unwrap().is_none());
    }

    #[test]
    fn members_and_scalars_follow_the_rules() {
        let f = FilterPath::parse("errors,items.*.status").unwrap().unwrap();
        let root = f.root();
        assert!(f.keeps_scalar(&root, "errors"));
        assert!(!f.keeps_scalar(&root, "took"));
        let Member::Descend(items) = f.member(&root, "items") else {
            panic!("items is descended into");
        };
        let Member::Descend(index) = f.member(&items, "index") else {
            panic!("an item is descended into");
        };
        assert!(f.keeps_scalar(&index, "status"));
        assert!(!f.keeps_scalar(&index, "_id"));
        assert_eq!(f.member(&index, "_shards"), Member::Drop);
        assert_eq!(f.member(&index, "status"), Member::Keep);
    }

    #[test]
    fn a_long_filter_is_refused() {
        let paths = |n| vec!["a"; n].join(",");
        assert!(FilterPath::parse(&paths(MAX_PATHS)).is_ok());
        let e = FilterPath::parse(&paths(MAX_PATHS + 1)).unwrap_err();
        assert!(e.contains("more than 32 paths"), "{e}");
        let fields = |n| vec!["a"; n].join(".");
        assert!(FilterPath::parse(&fields(MAX_FIELDS)).is_ok());
        let e = FilterPath::parse(&fields(MAX_FIELDS + 1)).unwrap_err();
        assert!(e.contains("more than 16 fields"), "{e}");
        let long = "a".repeat(MAX_BYTES);
        assert!(FilterPath::parse(&long).is_ok());
        let e = FilterPath::parse(&format!("{long}b")).unwrap_err();
        assert!(e.contains("longer than 1024 bytes"), "{e}");
    }
}
