//! The service config's `loadBalancingConfig`: the first policy this balancer supports
//! wins, as in gRPC. `round_robin` is plain balancing; `outlier_detection` (A50's
//! `outlier_detection_experimental` too) wraps it with [`OutlierConfig`], A50's fields
//! and defaults, plus `consecutiveFailures` {`threshold`, `codes`}.

use serde_json::Value;

use super::{FailurePercentage, OutlierConfig, SuccessRate};
use crate::{
    Code,
    retry::{
        config::{ConfigError, Path, codes, duration, err, number, string},
        policy::CodeSet,
    },
};

/// The statuses that count as a failure when `consecutiveFailures.codes` is not given.
pub const DEFAULT_FAILURE_CODES: [Code; 4] = [Code::Unavailable, Code::Internal, Code::Unknown, Code::DataLoss];

/// Outlier detection if the chosen policy has it; `None` for plain round-robin.
pub(crate) fn parse(v: &Value, p: &Path) -> Result<Option<OutlierConfig>, ConfigError> {
    let list = v.as_array().ok_or_else(|| err(p, "must be an array"))?;
    for (i, entry) in list.iter().enumerate() {
        let ip = p.index(i);
        let obj = entry.as_object().ok_or_else(|| err(&ip, "must be an object"))?;
        let [(name, body)] = obj.iter().collect::<Vec<_>>()[..] else {
            return Err(err(&ip, "must have exactly one policy name"));
        };
        match name.as_str() {
            "round_robin" => return Ok(None),
            "outlier_detection" | "outlier_detection_experimental" => {
                return outlier(body, &ip.key(name)).map(Some);
            }
            _ => {} // gRPC skips policies it does not know
        }
    }
    Err(err(p, "lists no supported policy (round_robin, outlier_detection)"))
}

fn outlier(v: &Value, p: &Path) -> Result<OutlierConfig, ConfigError> {
    v.as_object().ok_or_else(|| err(p, "must be an object"))?;
    let mut c = OutlierConfig::default();
    let dur = |key: &str, default| -> Result<_, ConfigError> {
        string(v, p, key)?.map_or(Ok(default), |s| duration(&s, &p.key(key)))
    };
    c.interval = dur("interval", c.interval)?;
    c.base_ejection_time = dur("baseEjectionTime", c.base_ejection_time)?;
    c.max_ejection_time = dur("maxEjectionTime", c.max_ejection_time)?;
    if c.interval.is_zero() {
        return Err(err(&p.key("interval"), "must be greater than 0"));
    }
    c.max_ejection_percent = percent(v, p, "maxEjectionPercent", c.max_ejection_percent)?;
    if let Some(sr) = section(v, p, "successRateEjection")? {
        let sp = p.key("successRateEjection");
        c.success_rate = Some(SuccessRate {
            stdev_factor: count(sr, &sp, "stdevFactor", 1900)?,
            enforcement_percentage: percent(sr, &sp, "enforcementPercentage", 100)?,
            minimum_hosts: count(sr, &sp, "minimumHosts", 5)?,
            request_volume: count(sr, &sp, "requestVolume", 100)?,
        });
    }
    if let Some(fp) = section(v, p, "failurePercentageEjection")? {
        let fpp = p.key("failurePercentageEjection");
        c.failure_percentage = Some(FailurePercentage {
            threshold: percent(fp, &fpp, "threshold", 85)?,
            enforcement_percentage: percent(fp, &fpp, "enforcementPercentage", 100)?,
            minimum_hosts: count(fp, &fpp, "minimumHosts", 5)?,
            request_volume: count(fp, &fpp, "requestVolume", 50)?,
        });
    }
    if let Some(cf) = section(v, p, "consecutiveFailures")? {
        let cp = p.key("consecutiveFailures");
        let threshold = count(cf, &cp, "threshold", 5)?;
        if threshold == 0 {
            return Err(err(&cp.key("threshold"), "must be at least 1"));
        }
        c.consecutive_failures = Some(threshold);
        if cf.get("codes").is_some() {
            c.codes = codes(cf, &cp, "codes")?;
        }
    }
    if let Some(child) = v.get("childPolicy") {
        let cp = p.key("childPolicy");
        let only_rr = child
            .as_array()
            .and_then(|l| l.first())
            .and_then(Value::as_object)
            .is_some_and(|o| o.len() == 1 && o.contains_key("round_robin"));
        if !only_rr {
            return Err(err(&cp, "must be [{\"round_robin\": {}}], the only child policy supported"));
        }
    }
    Ok(c)
}

/// An optional object field.
fn section<'a>(v: &'a Value, p: &Path, key: &str) -> Result<Option<&'a Value>, ConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(o @ Value::Object(_)) => Ok(Some(o)),
        Some(_) => Err(err(&p.key(key), "must be an object")),
    }
}

/// A non-negative integer field, `default` when absent.
fn count(v: &Value, p: &Path, key: &str, default: u32) -> Result<u32, ConfigError> {
    match number(v, p, key)? {
        None => Ok(default),
        Some(n) if n >= 0.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX) => Ok(n as u32),
        Some(n) => Err(err(&p.key(key), format!("must be a whole number of at least 0, got {n}"))),
    }
}

/// A percentage field: 0 to 100.
fn percent(v: &Value, p: &Path, key: &str, default: u32) -> Result<u32, ConfigError> {
    let n = count(v, p, key, default)?;
    if n > 100 {
        return Err(err(&p.key(key), format!("must be a percentage from 0 to 100, got {n}")));
    }
    Ok(n)
}

impl OutlierConfig {
    /// Whether an attempt that ended with `code` counts as a failure (a lost connection
    /// is UNAVAILABLE). The caller's own cancel or deadline never does.
    pub fn is_failure(&self, code: Code) -> bool {
        self.codes.contains(code)
    }
}

/// The default failure codes as a set.
pub(super) fn default_codes() -> CodeSet {
    DEFAULT_FAILURE_CODES.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::retry::ServiceConfig;

    fn parse(json: &str) -> Result<Option<OutlierConfig>, String> {
        ServiceConfig::parse(json, 5).map(|c| c.outlier).map_err(|e| e.to_string())
    }

    #[test]
    fn a50_fields_and_defaults_under_either_name() {
        for name in ["outlier_detection", "outlier_detection_experimental"] {
            let json = format!(
                r#"{{"loadBalancingConfig":[{{"{name}":{{"interval":"1s","maxEjectionPercent":50,
                "failurePercentageEjection":{{}},"consecutiveFailures":{{"threshold":3}},
                "childPolicy":[{{"round_robin":{{}}}}]}}}}]}}"#
            );
            let c = parse(&json).unwrap().unwrap();
            assert_eq!(c.interval, Duration::from_secs(1));
            assert_eq!(
                (c.base_ejection_time, c.max_ejection_time),
                (Duration::from_secs(30), Duration::from_secs(300))
            );
            assert_eq!(c.max_ejection_percent, 50);
            let fp =
                FailurePercentage { threshold: 85, enforcement_percentage: 100, minimum_hosts: 5, request_volume: 50 };
            assert_eq!(c.failure_percentage, Some(fp));
            assert_eq!(c.success_rate, None);
            assert_eq!(c.consecutive_failures, Some(3));
            assert!(c.is_failure(Code::Unavailable) && c.is_failure(Code::DataLoss) && !c.is_failure(Code::NotFound));
        }
        assert_eq!(parse(r#"{"loadBalancingConfig":[{"round_robin":{}}]}"#), Ok(None));
        assert_eq!(parse(r#"{"loadBalancingConfig":[{"weighted_target":{}},{"round_robin":{}}]}"#), Ok(None));
        let sr = parse(r#"{"loadBalancingConfig":[{"outlier_detection":{"successRateEjection":{}}}]}"#);
        let want =
            SuccessRate { stdev_factor: 1900, enforcement_percentage: 100, minimum_hosts: 5, request_volume: 100 };
        assert_eq!(sr.unwrap().unwrap().success_rate, Some(want));
    }

    #[test]
    fn bad_values_name_the_path_and_the_rule() {
        let od = |body: &str| parse(&format!(r#"{{"loadBalancingConfig":[{{"outlier_detection":{body}}}]}}"#));
        assert_eq!(
            od(r#"{"maxEjectionPercent":101}"#).unwrap_err(),
            "loadBalancingConfig[0].outlier_detection.maxEjectionPercent: must be a percentage from 0 to 100, got 101"
        );
        assert_eq!(
            od(r#"{"failurePercentageEjection":{"requestVolume":-1}}"#).unwrap_err(),
            "loadBalancingConfig[0].outlier_detection.failurePercentageEjection.requestVolume: must be a whole number of at least 0, got -1"
        );
        assert!(
            od(r#"{"baseEjectionTime":"-1s"}"#)
                .unwrap_err()
                .starts_with("loadBalancingConfig[0].outlier_detection.baseEjectionTime: expected a duration")
        );
        assert_eq!(
            od(r#"{"successRateEjection":5}"#).unwrap_err(),
            "loadBalancingConfig[0].outlier_detection.successRateEjection: must be an object"
        );
        assert_eq!(
            od(r#"{"childPolicy":[{"pick_first":{}}]}"#).unwrap_err(),
            "loadBalancingConfig[0].outlier_detection.childPolicy: must be [{\"round_robin\": {}}], the only child policy supported"
        );
        assert_eq!(
            od(r#"{"consecutiveFailures":{"threshold":0}}"#).unwrap_err(),
            "loadBalancingConfig[0].outlier_detection.consecutiveFailures.threshold: must be at least 1"
        );
        assert_eq!(
            parse(r#"{"loadBalancingConfig":[{"weighted_target":{}}]}"#).unwrap_err(),
            "loadBalancingConfig: lists no supported policy (round_robin, outlier_detection)"
        );
        assert_eq!(
            parse(r#"{"loadBalancingConfig":[{"round_robin":{},"pick_first":{}}]}"#).unwrap_err(),
            "loadBalancingConfig[0]: must have exactly one policy name"
        );
    }

    #[test]
    fn health_check_config_names_the_service() {
        let c = ServiceConfig::parse(r#"{"healthCheckConfig":{"serviceName":"hello.HelloService"}}"#, 5).unwrap();
        assert_eq!(c.health_check_service.as_deref(), Some("hello.HelloService"));
        let c = ServiceConfig::parse(r#"{"healthCheckConfig":{}}"#, 5).unwrap();
        assert_eq!(c.health_check_service.as_deref(), Some(""), "the server's overall health");
        let e = ServiceConfig::parse(r#"{"healthCheckConfig":{"serviceName":7}}"#, 5).unwrap_err();
        assert_eq!(e.to_string(), "healthCheckConfig.serviceName: must be a string");
    }
}
