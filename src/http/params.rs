//! Query parameter parsing with error sentences that name the parameter.

use std::time::Duration;

use super::ApiError;

/// Parses `true|false|1|0`.
pub fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::BadRequest(format!(
            "query parameter {name}={v:?} must be true or false"
        ))),
    }
}

/// Parses a non-negative integer.
pub fn parse_u64(name: &str, v: &str) -> Result<u64, ApiError> {
    v.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "query parameter {name}={v:?} must be a non-negative integer"
        ))
    })
}

/// Parses a humantime duration (`250ms`, `10s`, `5m`), at most `max`.
pub fn parse_duration(name: &str, v: &str, max: Duration) -> Result<Duration, ApiError> {
    let d = humantime::parse_duration(v).map_err(|e| {
        ApiError::BadRequest(format!(
            "query parameter {name}={v:?} must be a duration like 250ms, 10s or 5m ({e})"
        ))
    })?;
    if d > max {
        return Err(ApiError::BadRequest(format!(
            "query parameter {name}={v:?} is above the limit of {}",
            humantime::format_duration(max)
        )));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_explains() {
        assert!(parse_bool("sync", "true").unwrap());
        assert!(!parse_bool("sync", "0").unwrap());
        let e = parse_bool("sync", "yes").unwrap_err().to_string();
        assert!(e.contains("sync"), "{e}");
        assert_eq!(parse_u64("offset", "42").unwrap(), 42);
        assert!(parse_u64("offset", "-1").is_err());
        let max = Duration::from_secs(60);
        assert_eq!(
            parse_duration("wait", "250ms", max).unwrap(),
            Duration::from_millis(250)
        );
        assert!(
            parse_duration("wait", "2m", max)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        assert!(parse_duration("wait", "soon", max).is_err());
    }
}
