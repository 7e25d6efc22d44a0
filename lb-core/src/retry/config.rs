//! The gRPC service config: `methodConfig[]` with `name[]`, `timeout`, `waitForReady`,
//! `retryPolicy` or `hedgingPolicy`, and the top-level `retryThrottling`. Validation
//! follows gRFC A6; every error names the JSON path and the rule broken.

use std::{fmt, time::Duration};

use crate::code::Code;
use serde_json::Value;

use super::policy::{CodeSet, HedgingPolicy, RetryPolicy};

/// A parsed, validated service config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceConfig {
    pub methods: Vec<MethodConfig>,
    /// `(maxTokens, tokenRatio)`.
    pub throttling: Option<(f64, f64)>,
    /// From `loadBalancingConfig`: outlier detection around round-robin, when chosen.
    pub outlier: Option<crate::outlier::OutlierConfig>,
    /// `healthCheckConfig.serviceName`: each endpoint's `grpc.health.v1.Health/Watch`.
    pub health_check_service: Option<String>,
}

/// What applies to the methods a `name[]` entry matches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodConfig {
    /// `(service, method)`; an empty service is the default, an empty method every
    /// method of the service.
    pub names: Vec<(String, String)>,
    pub timeout: Option<Duration>,
    pub wait_for_ready: Option<bool>,
    pub retry: Option<RetryPolicy>,
    pub hedging: Option<HedgingPolicy>,
}

impl MethodConfig {
    /// Whether a call under `method` (its [`ServiceConfig::lookup`]) waits for a ready
    /// endpoint when none is: unless it says `waitForReady: false`, as the proxy hides
    /// a replica's absence.
    pub fn waits_for_ready(method: Option<&MethodConfig>) -> bool {
        method.and_then(|m| m.wait_for_ready) != Some(false)
    }
}

/// Where in the JSON a rule was broken, and which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {rule}")]
pub struct ConfigError {
    pub path: String,
    pub rule: String,
}

pub(crate) fn err(path: &Path, rule: impl fmt::Display) -> ConfigError {
    ConfigError { path: path.to_string(), rule: rule.to_string() }
}

/// A JSON path like `methodConfig[0].retryPolicy.maxAttempts`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Path(String);

impl Path {
    pub(crate) fn key(&self, k: &str) -> Path {
        if self.0.is_empty() { Path(k.to_owned()) } else { Path(format!("{}.{k}", self.0)) }
    }
    pub(crate) fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "(root)" } else { &self.0 })
    }
}

impl ServiceConfig {
    /// Parses `json`; `max_attempts` clamps every policy's `maxAttempts` (A6 default 5).
    pub fn parse(json: &str, max_attempts: u32) -> Result<Self, ConfigError> {
        let root: Value =
            serde_json::from_str(json).map_err(|e| err(&Path::default(), format!("invalid JSON: {e}")))?;
        let root_path = Path::default();
        let obj = root.as_object().ok_or_else(|| err(&root_path, "must be an object"))?;
        let mut cfg = ServiceConfig::default();
        if let Some(list) = obj.get("methodConfig") {
            let p = root_path.key("methodConfig");
            let list = list.as_array().ok_or_else(|| err(&p, "must be an array"))?;
            for (i, m) in list.iter().enumerate() {
                let m = method(m, &p.index(i), max_attempts)?;
                for (j, name) in m.names.iter().enumerate() {
                    if cfg.methods.iter().any(|c| c.names.contains(name)) || m.names[..j].contains(name) {
                        let (s, mname) = name;
                        let what = if s.is_empty() { "the default name".to_owned() } else { format!("{s}/{mname}") };
                        return Err(err(&p.index(i).key("name").index(j), format!("{what} appears twice")));
                    }
                }
                cfg.methods.push(m);
            }
        }
        if let Some(lb) = obj.get("loadBalancingConfig") {
            cfg.outlier = crate::outlier::config::parse(lb, &root_path.key("loadBalancingConfig"))?;
        }
        if let Some(h) = obj.get("healthCheckConfig") {
            let p = root_path.key("healthCheckConfig");
            h.as_object().ok_or_else(|| err(&p, "must be an object"))?;
            cfg.health_check_service = Some(string(h, &p, "serviceName")?.unwrap_or_default());
        }
        if let Some(t) = obj.get("retryThrottling") {
            let p = root_path.key("retryThrottling");
            let max_tokens = number(t, &p, "maxTokens")?.ok_or_else(|| err(&p.key("maxTokens"), "is required"))?;
            if !(max_tokens > 0.0 && max_tokens <= 1000.0) {
                return Err(err(&p.key("maxTokens"), format!("must be in (0, 1000], got {max_tokens}")));
            }
            let ratio = number(t, &p, "tokenRatio")?.ok_or_else(|| err(&p.key("tokenRatio"), "is required"))?;
            // A6 keeps three decimals: anything that rounds to 0 would never refill.
            if !(ratio * 1000.0).round().is_normal() || ratio * 1000.0 > f64::from(u32::MAX) {
                return Err(err(&p.key("tokenRatio"), format!("must be at least 0.001, got {ratio}")));
            }
            cfg.throttling = Some((max_tokens, ratio));
        }
        Ok(cfg)
    }

    /// The config for `/package.Service/Method`: an exact name, else the service, else
    /// the default (an empty name).
    pub fn lookup(&self, path: &str) -> Option<&MethodConfig> {
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        let find = |s: &str, m: &str| self.methods.iter().find(|c| c.names.iter().any(|(cs, cm)| cs == s && cm == m));
        find(service, method).or_else(|| find(service, "")).or_else(|| find("", ""))
    }
}

fn method(v: &Value, p: &Path, max_attempts: u32) -> Result<MethodConfig, ConfigError> {
    let obj = v.as_object().ok_or_else(|| err(p, "must be an object"))?;
    let mut m = MethodConfig::default();
    if let Some(names) = obj.get("name") {
        let np = p.key("name");
        for (i, n) in names.as_array().ok_or_else(|| err(&np, "must be an array"))?.iter().enumerate() {
            let ip = np.index(i);
            let service = string(n, &ip, "service")?.unwrap_or_default();
            let method = string(n, &ip, "method")?.unwrap_or_default();
            if service.is_empty() && !method.is_empty() {
                return Err(err(&ip.key("service"), "is required when method is set"));
            }
            m.names.push((service, method));
        }
    }
    if let Some(t) = string(v, p, "timeout")? {
        m.timeout = Some(duration(&t, &p.key("timeout"))?);
    }
    if let Some(w) = obj.get("waitForReady") {
        m.wait_for_ready = Some(w.as_bool().ok_or_else(|| err(&p.key("waitForReady"), "must be true or false"))?);
    }
    if obj.contains_key("retryPolicy") && obj.contains_key("hedgingPolicy") {
        return Err(err(p, "a method has retryPolicy or hedgingPolicy, not both"));
    }
    if let Some(r) = obj.get("retryPolicy") {
        m.retry = Some(retry(r, &p.key("retryPolicy"), max_attempts)?);
    }
    if let Some(h) = obj.get("hedgingPolicy") {
        m.hedging = Some(hedging(h, &p.key("hedgingPolicy"), max_attempts)?);
    }
    Ok(m)
}

fn retry(v: &Value, p: &Path, clamp: u32) -> Result<RetryPolicy, ConfigError> {
    let max_attempts = attempts(v, p, clamp)?;
    let positive = |key: &str| -> Result<Duration, ConfigError> {
        let kp = p.key(key);
        let d = duration(&string(v, p, key)?.ok_or_else(|| err(&kp, "is required"))?, &kp)?;
        if d.is_zero() {
            return Err(err(&kp, "must be greater than 0"));
        }
        Ok(d)
    };
    let initial_backoff = positive("initialBackoff")?;
    let max_backoff = positive("maxBackoff")?;
    let mp = p.key("backoffMultiplier");
    let multiplier = number(v, p, "backoffMultiplier")?.ok_or_else(|| err(&mp, "is required"))?;
    if multiplier <= 0.0 {
        return Err(err(&mp, format!("must be greater than 0, got {multiplier}")));
    }
    let retryable = codes(v, p, "retryableStatusCodes")?;
    if retryable.is_empty() {
        return Err(err(&p.key("retryableStatusCodes"), "must list at least one status code"));
    }
    Ok(RetryPolicy { max_attempts, initial_backoff, max_backoff, multiplier, retryable })
}

fn hedging(v: &Value, p: &Path, clamp: u32) -> Result<HedgingPolicy, ConfigError> {
    let max_attempts = attempts(v, p, clamp)?;
    let delay = match string(v, p, "hedgingDelay")? {
        Some(d) => duration(&d, &p.key("hedgingDelay"))?,
        None => Duration::ZERO,
    };
    Ok(HedgingPolicy { max_attempts, delay, non_fatal: codes(v, p, "nonFatalStatusCodes")? })
}

fn attempts(v: &Value, p: &Path, clamp: u32) -> Result<u32, ConfigError> {
    let kp = p.key("maxAttempts");
    let n = number(v, p, "maxAttempts")?.ok_or_else(|| err(&kp, "is required"))?;
    if n.fract() != 0.0 || n < 2.0 {
        return Err(err(&kp, format!("must be an integer of at least 2, got {n}")));
    }
    Ok((n as u32).min(clamp))
}

pub(crate) fn string(v: &Value, p: &Path, key: &str) -> Result<Option<String>, ConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(&p.key(key), "must be a string")),
    }
}

pub(crate) fn number(v: &Value, p: &Path, key: &str) -> Result<Option<f64>, ConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(err(&p.key(key), "must be a number")),
    }
}

pub(crate) fn codes(v: &Value, p: &Path, key: &str) -> Result<CodeSet, ConfigError> {
    let kp = p.key(key);
    let mut set = CodeSet::default();
    let Some(list) = v.get(key) else { return Ok(set) };
    for (i, c) in list.as_array().ok_or_else(|| err(&kp, "must be an array"))?.iter().enumerate() {
        let code = match c {
            Value::String(s) => Code::parse(s),
            Value::Number(n) => {
                n.as_u64().map_or(Err(format!("{n} is not a status code")), |n| Code::parse(&n.to_string()))
            }
            _ => Err("must be a status code name or number".to_owned()),
        }
        .map_err(|e| err(&kp.index(i), e))?;
        if code == Code::Ok {
            return Err(err(&kp.index(i), "OK cannot be retried"));
        }
        set.insert(code);
    }
    Ok(set)
}

/// A protobuf JSON duration: decimal seconds with an `s` suffix, like "0.5s".
pub(crate) fn duration(s: &str, p: &Path) -> Result<Duration, ConfigError> {
    let bad = || err(p, format!("expected a duration like \"0.5s\", got {s:?}"));
    /// google.protobuf.Duration's range: about 10,000 years.
    const MAX_SECS: f64 = 315_576_000_000.0;
    let secs: f64 = s.strip_suffix('s').ok_or_else(bad)?.parse().map_err(|_| bad())?;
    if secs > MAX_SECS {
        return Err(err(p, format!("{s:?} is beyond protobuf's Duration range ({MAX_SECS}s)")));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "methodConfig": [
        {"name": [{"service": "hello.HelloService", "method": "SayHello"}],
         "timeout": "2s",
         "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.1s", "maxBackoff": "1s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", 8]}},
        {"name": [{"service": "hello.HelloService"}],
         "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.05s", "nonFatalStatusCodes": ["unavailable"]}},
        {"name": [{}], "waitForReady": false}
      ],
      "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
    }"#;

    #[test]
    fn parses_a_full_config_and_clamps_attempts() {
        let c = ServiceConfig::parse(GOOD, 5).unwrap();
        let r = c.methods[0].retry.as_ref().unwrap();
        assert_eq!(r.max_attempts, 5);
        assert_eq!(r.initial_backoff, Duration::from_millis(100));
        assert!(r.retryable.contains(Code::Unavailable) && r.retryable.contains(Code::ResourceExhausted));
        assert_eq!(c.methods[0].timeout, Some(Duration::from_secs(2)));
        let h = c.methods[1].hedging.as_ref().unwrap();
        assert_eq!((h.max_attempts, h.delay), (3, Duration::from_millis(50)));
        assert_eq!(c.throttling, Some((10.0, 0.1)));
    }

    #[test]
    fn looks_up_exact_then_service_then_default() {
        let c = ServiceConfig::parse(GOOD, 5).unwrap();
        assert!(c.lookup("/hello.HelloService/SayHello").unwrap().retry.is_some());
        assert!(c.lookup("/hello.HelloService/SayHelloStream").unwrap().hedging.is_some());
        assert_eq!(c.lookup("/other.Svc/X").unwrap().wait_for_ready, Some(false));
        assert_eq!(ServiceConfig::default().lookup("/a.B/C"), None);
    }

    fn error_of(json: &str) -> String {
        ServiceConfig::parse(json, 5).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_path_and_the_rule() {
        let policy = |body: &str| format!(r#"{{"methodConfig":[{{"name":[{{}}],"retryPolicy":{body}}}]}}"#);
        assert_eq!(
            error_of(&policy(
                r#"{"maxAttempts":1,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#
            )),
            "methodConfig[0].retryPolicy.maxAttempts: must be an integer of at least 2, got 1"
        );
        assert_eq!(
            error_of(&policy(
                r#"{"maxAttempts":2,"initialBackoff":"0s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#
            )),
            "methodConfig[0].retryPolicy.initialBackoff: must be greater than 0"
        );
        assert_eq!(
            error_of(&policy(
                r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":0,"retryableStatusCodes":["UNAVAILABLE"]}"#
            )),
            "methodConfig[0].retryPolicy.backoffMultiplier: must be greater than 0, got 0"
        );
        assert_eq!(
            error_of(&policy(
                r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":[]}"#
            )),
            "methodConfig[0].retryPolicy.retryableStatusCodes: must list at least one status code"
        );
        assert!(error_of(&policy(r#"{"maxAttempts":2,"initialBackoff":"1","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["X"]}"#))
            .starts_with("methodConfig[0].retryPolicy.initialBackoff: expected a duration"));
        assert_eq!(
            error_of(r#"{"methodConfig":[{"retryPolicy":{},"hedgingPolicy":{}}]}"#),
            "methodConfig[0]: a method has retryPolicy or hedgingPolicy, not both"
        );
        assert_eq!(
            error_of(r#"{"retryThrottling":{"maxTokens":0,"tokenRatio":1}}"#),
            "retryThrottling.maxTokens: must be in (0, 1000], got 0"
        );
        assert!(error_of("{").starts_with("(root): invalid JSON"));
        assert_eq!(
            error_of(r#"{"retryThrottling":{"maxTokens":10,"tokenRatio":0.0004}}"#),
            "retryThrottling.tokenRatio: must be at least 0.001, got 0.0004"
        );
        assert_eq!(
            error_of(
                r#"{"methodConfig":[{"name":[{"service":"a.B"}]},{"name":[{"service":"c.D"},{"service":"a.B"}]}]}"#
            ),
            "methodConfig[1].name[1]: a.B/ appears twice"
        );
        assert_eq!(
            error_of(r#"{"methodConfig":[{"name":[{},{}]}]}"#),
            "methodConfig[0].name[1]: the default name appears twice"
        );
        assert!(
            error_of(r#"{"methodConfig":[{"name":[{}],"timeout":"1e19s"}]}"#)
                .starts_with("methodConfig[0].timeout: \"1e19s\" is beyond protobuf's Duration range")
        );
        assert!(error_of(&policy(r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["NOPE"]}"#))
            .starts_with("methodConfig[0].retryPolicy.retryableStatusCodes[0]: unknown gRPC status code"));
    }
}
