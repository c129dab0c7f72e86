//! The operator's own check of a resource against its CRD's structural
//! schema — the very schema `crdgen` writes into `crds/`: types, enums,
//! bounds, lengths, patterns, required and unknown fields.
//!
//! The API server enforces the same schema, but not always: an older CRD
//! version, `kubectl apply --validate=false` against a server that prunes
//! instead of refusing, or an emulator without OpenAPI. The operator judges
//! every resource itself, from the one definition, and names the field and
//! the reason the way the API server would.
//!
//! Only what Kubernetes' structural schemas allow is understood (no `$ref`,
//! no `anyOf` beyond what kube generates); CEL rules
//! (`x-kubernetes-validations`) are checked by the specs' own `validate()`.

use std::fmt;

use serde_json::Value;

/// One refused field, Kubernetes style: `spec.retry.maxAttempts: …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Stop collecting after this many errors: a 50,000-entry list of bad URLs
/// must not turn into a 50,000-line condition.
const MAX_ERRORS: usize = 20;

/// Checks `value` (found at `path`) against `schema`; returns every error
/// found, at most [`MAX_ERRORS`].
pub fn check(schema: &Value, value: &Value, path: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    walk(schema, value, path, &mut errors);
    errors
}

/// The errors as one message: the first few, and how many more.
pub fn describe(errors: &[FieldError]) -> String {
    const SHOWN: usize = 3;
    let mut msg = errors
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > SHOWN {
        let more = errors.len() - SHOWN;
        let plus = if errors.len() >= MAX_ERRORS { "+" } else { "" };
        msg.push_str(&format!(" (and {more}{plus} more)"));
    }
    msg
}

fn push(errors: &mut Vec<FieldError>, path: &str, message: String) {
    if errors.len() < MAX_ERRORS {
        errors.push(FieldError {
            path: path.to_string(),
            message,
        });
    }
}

fn walk(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if errors.len() >= MAX_ERRORS {
        return;
    }
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) && schema.get("type").is_some() {
            push(errors, path, "must not be null".into());
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list = allowed
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        push(
            errors,
            path,
            format!(
                "Unsupported value: {}: supported values: {list}",
                short(value)
            ),
        );
        return;
    }
    match schema["type"].as_str() {
        Some("object") => object(schema, value, path, errors),
        Some("array") => array(schema, value, path, errors),
        Some("string") => string(schema, value, path, errors),
        Some("integer") => integer(schema, value, path, errors),
        Some("number") => number(schema, value, path, errors),
        Some("boolean") if !value.is_boolean() => {
            push(errors, path, type_error(value, "boolean"));
        }
        _ => {}
    }
}

fn object(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(fields) = value.as_object() else {
        return push(errors, path, type_error(value, "object"));
    };
    let properties = schema["properties"].as_object();
    let open = schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true);
    for (name, v) in fields {
        let at = format!("{path}.{name}");
        match (
            properties.and_then(|p| p.get(name)),
            &schema["additionalProperties"],
        ) {
            (Some(s), _) => walk(s, v, &at, errors),
            (None, extra @ Value::Object(_)) => walk(extra, v, &at, errors),
            (None, _) if open => {}
            (None, _) => push(
                errors,
                &at,
                "unknown field (not in the schema; check its spelling and the CRD version)".into(),
            ),
        }
    }
    for name in schema["required"].as_array().into_iter().flatten() {
        if let Some(name) = name.as_str()
            && !fields.contains_key(name)
        {
            push(errors, &format!("{path}.{name}"), "Required value".into());
        }
    }
}

fn array(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(items) = value.as_array() else {
        return push(errors, path, type_error(value, "array"));
    };
    if let Some(max) = schema["maxItems"].as_u64()
        && items.len() as u64 > max
    {
        // Judging each of 50,000 items would only repeat this.
        return push(
            errors,
            path,
            format!("Too many: {}: must have at most {max} items", items.len()),
        );
    }
    if let Some(min) = schema["minItems"].as_u64()
        && (items.len() as u64) < min
    {
        push(
            errors,
            path,
            format!("must have at least {min} items, has {}", items.len()),
        );
    }
    for (i, item) in items.iter().enumerate() {
        walk(&schema["items"], item, &format!("{path}[{i}]"), errors);
    }
}

fn string(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(s) = value.as_str() else {
        return push(errors, path, type_error(value, "string"));
    };
    let chars = s.chars().count() as u64;
    if let Some(max) = schema["maxLength"].as_u64()
        && chars > max
    {
        push(
            errors,
            path,
            format!("Too long: may not be more than {max} characters ({chars} given)"),
        );
    }
    if let Some(min) = schema["minLength"].as_u64()
        && chars < min
    {
        push(
            errors,
            path,
            format!(
                "Invalid value: {}: must be at least {min} characters",
                short(value)
            ),
        );
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        match regex::Regex::new(pattern) {
            Ok(re) if !re.is_match(s) => push(
                errors,
                path,
                format!("Invalid value: {}: must match {pattern:?}", short(value)),
            ),
            Ok(_) => {}
            // The schema is ours: a pattern that does not compile is a bug
            // that the CRD tests catch, not something to refuse users for.
            Err(_) => {}
        }
    }
}

fn integer(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let n: i128 = match (value.as_i64(), value.as_u64()) {
        (Some(n), _) => n.into(),
        (None, Some(n)) => n.into(),
        _ => return push(errors, path, type_error(value, "integer")),
    };
    let (lo, hi): (i128, i128) = match schema["format"].as_str() {
        Some("int32") => (i32::MIN.into(), i32::MAX.into()),
        Some("uint32") => (0, u32::MAX.into()),
        Some("uint64") => (0, u64::MAX.into()),
        Some("uint16") => (0, u16::MAX.into()),
        Some("uint8") => (0, u8::MAX.into()),
        _ => (i64::MIN.into(), i64::MAX.into()),
    };
    if n < lo || n > hi {
        return push(
            errors,
            path,
            format!("Invalid value: {n}: out of range [{lo}, {hi}]"),
        );
    }
    bounds(schema, n as f64, &n.to_string(), path, errors);
}

fn number(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(n) = value.as_f64() else {
        return push(errors, path, type_error(value, "number"));
    };
    bounds(schema, n, &n.to_string(), path, errors);
}

fn bounds(schema: &Value, n: f64, shown: &str, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(max) = schema["maximum"].as_f64()
        && n > max
    {
        push(
            errors,
            path,
            format!("Invalid value: {shown}: must be less than or equal to {max}"),
        );
    }
    if let Some(min) = schema["minimum"].as_f64()
        && n < min
    {
        push(
            errors,
            path,
            format!("Invalid value: {shown}: must be greater than or equal to {min}"),
        );
    }
}

fn type_error(value: &Value, want: &str) -> String {
    let got = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    format!(
        "Invalid value: {}: must be of type {want}, not {got}",
        short(value)
    )
}

/// A value as shown in a message: short, whatever it holds.
fn short(value: &Value) -> String {
    const MAX: usize = 64;
    let s = match value {
        Value::Array(a) => format!("[{} items]", a.len()),
        Value::Object(o) => format!("{{{} fields}}", o.len()),
        v => v.to_string(),
    };
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-z]+$"},
                "size": {"type": "integer", "format": "uint32", "minimum": 1.0, "maximum": 10.0},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "opt": {"type": "string", "nullable": true},
                "list": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "ratio": {"type": "number", "maximum": 1.0},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            }
        })
    }

    fn errors(v: Value) -> Vec<String> {
        check(&schema(), &v, "spec")
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn a_valid_value_has_no_errors() {
        let ok = json!({"name": "abc", "size": 3, "mode": "a", "opt": null, "list": ["x"],
                        "ratio": 0.5, "free": {"anything": [1]}, "labels": {"k": "v"}});
        assert_eq!(errors(ok), Vec::<String>::new());
    }

    #[test]
    fn each_rule_names_the_field_and_the_reason() {
        let cases = [
            (json!({}), "spec.name: Required value"),
            (
                json!({"name": 7}),
                "spec.name: Invalid value: 7: must be of type string",
            ),
            (
                json!({"name": "abcdef"}),
                "spec.name: Too long: may not be more than 5",
            ),
            (
                json!({"name": ""}),
                "spec.name: Invalid value: \"\": must be at least 1",
            ),
            (
                json!({"name": "A"}),
                "spec.name: Invalid value: \"A\": must match",
            ),
            (
                json!({"name": "a", "size": 11}),
                "spec.size: Invalid value: 11: must be less than or equal to 10",
            ),
            (
                json!({"name": "a", "size": 0}),
                "spec.size: Invalid value: 0: must be greater than or equal to 1",
            ),
            (
                json!({"name": "a", "size": -1}),
                "spec.size: Invalid value: -1: out of range [0, 4294967295]",
            ),
            (
                json!({"name": "a", "size": 1.5}),
                "spec.size: Invalid value: 1.5: must be of type integer, not number",
            ),
            (
                json!({"name": "a", "size": "3"}),
                "spec.size: Invalid value: \"3\": must be of type integer, not string",
            ),
            (
                json!({"name": "a", "mode": "c"}),
                "spec.mode: Unsupported value: \"c\": supported values: \"a\", \"b\"",
            ),
            (
                json!({"name": "a", "list": ["x", "y", "z"]}),
                "spec.list: Too many: 3: must have at most 2 items",
            ),
            (
                json!({"name": "a", "list": [1]}),
                "spec.list[0]: Invalid value: 1: must be of type string",
            ),
            (
                json!({"name": "a", "bogus": 1}),
                "spec.bogus: unknown field",
            ),
            (
                json!({"name": "a", "labels": {"k": 1}}),
                "spec.labels.k: Invalid value: 1",
            ),
            (json!({"name": null}), "spec.name: must not be null"),
            (
                json!({"name": "a", "ratio": 2.5}),
                "spec.ratio: Invalid value: 2.5: must be less than or equal to 1",
            ),
            (
                json!("text"),
                "spec: Invalid value: \"text\": must be of type object, not string",
            ),
        ];
        for (value, want) in cases {
            let got = errors(value.clone());
            assert!(
                got.iter().any(|e| e.starts_with(want)),
                "{value}: expected {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn a_huge_list_gives_one_bounded_message() {
        let many: Vec<Value> = (0..50_000).map(|i| json!(i)).collect();
        let errs = check(&schema(), &json!({"name": "a", "list": many}), "spec");
        assert_eq!(errs.len(), 1);
        let bad: Vec<Value> = (0..2).map(|_| json!(1)).collect();
        let mut s = schema();
        s["properties"]["list"]["maxItems"] = json!(100_000);
        let four: Vec<Value> = [bad.clone(), bad].concat();
        let errs = check(&s, &json!({"name": "a", "list": four}), "spec");
        assert_eq!(errs.len(), 4);
        let hundred: Vec<Value> = (0..100).map(|_| json!(1)).collect();
        let errs = check(&s, &json!({"name": "a", "list": hundred}), "spec");
        assert_eq!(errs.len(), MAX_ERRORS);
        assert!(
            describe(&errs).ends_with("(and 17+ more)"),
            "{}",
            describe(&errs)
        );
    }
}
