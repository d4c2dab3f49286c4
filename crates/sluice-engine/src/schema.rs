//! Checks tool arguments against the tool's JSON Schema before the tool runs.
//!
//! The subset models are actually given (and use): `type` (one or several), `properties`,
//! `required`, `additionalProperties: false`, `enum`, `const`, `items`, `minimum`/`maximum`,
//! `minLength`/`maxLength`, `minItems`/`maxItems`. Other keywords are ignored rather than refused,
//! so a richer schema still validates what it can. Errors name the path (`/rows/2/0`) so the model
//! can correct itself.

use serde_json::Value;

/// Every violation found, as `path: what is wrong`.
pub fn validate(schema: &Value, value: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    check(schema, value, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn matches_type(expected: &str, v: &Value) -> bool {
    let actual = type_name(v);
    actual == expected || (expected == "number" && actual == "integer")
}

fn check(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        return;
    };
    let at = if path.is_empty() { "/" } else { path };
    if let Some(t) = schema.get("type") {
        let allowed: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => Vec::new(),
        };
        if !allowed.is_empty() && !allowed.iter().any(|t| matches_type(t, v)) {
            errors.push(format!(
                "{at}: expected {}, got {}",
                allowed.join(" or "),
                type_name(v)
            ));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(|e| e.as_array())
        && !options.contains(v)
    {
        errors.push(format!(
            "{at}: must be one of {}",
            Value::Array(options.clone())
        ));
    }
    if let Some(c) = schema.get("const")
        && c != v
    {
        errors.push(format!("{at}: must be {c}"));
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(|p| p.as_object());
            if let Some(required) = schema.get("required").and_then(|r| r.as_array()) {
                for name in required.iter().filter_map(|r| r.as_str()) {
                    if !map.contains_key(name) {
                        errors.push(format!("{path}/{name}: is required"));
                    }
                }
            }
            for (key, value) in map {
                match props.and_then(|p| p.get(key)) {
                    Some(sub) => check(sub, value, &format!("{path}/{key}"), errors),
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        errors.push(format!("{path}/{key}: is not an allowed property"));
                    }
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(|m| m.as_u64())
                && (items.len() as u64) < min
            {
                errors.push(format!(
                    "{at}: needs at least {min} items, has {}",
                    items.len()
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(|m| m.as_u64())
                && (items.len() as u64) > max
            {
                errors.push(format!(
                    "{at}: allows at most {max} items, has {}",
                    items.len()
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}/{i}"), errors);
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(|m| m.as_u64())
                && len < min
            {
                errors.push(format!("{at}: must be at least {min} characters"));
            }
            if let Some(max) = schema.get("maxLength").and_then(|m| m.as_u64())
                && len > max
            {
                errors.push(format!("{at}: must be at most {max} characters"));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(|m| m.as_f64())
                && x < min
            {
                errors.push(format!("{at}: must be >= {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(|m| m.as_f64())
                && x > max
            {
                errors.push(format!("{at}: must be <= {max}"));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn violations_name_their_path() {
        let schema = json!({
            "type": "object",
            "properties": {
                "title": {"type": "string", "minLength": 1},
                "kind": {"enum": ["bar", "line"]},
                "rows": {"type": "array", "items": {"type": "array", "items": {"type": ["string", "number"]}}, "minItems": 1},
                "limit": {"type": "integer", "minimum": 0, "maximum": 10}
            },
            "required": ["title", "rows"],
            "additionalProperties": false
        });
        assert!(
            validate(
                &schema,
                &json!({"title": "t", "rows": [["a", 1.5]], "kind": "bar", "limit": 3})
            )
            .is_ok()
        );
        let errors = validate(
            &schema,
            &json!({"rows": [["a", true]], "kind": "pie", "limit": 11, "extra": 1}),
        )
        .expect_err("invalid");
        for expected in [
            "/title: is required",
            "/rows/0/1: expected string or number, got boolean",
            "/kind: must be one of",
            "/limit: must be <= 10",
            "/extra: is not an allowed property",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "{expected} in {errors:?}"
            );
        }
        assert_eq!(
            validate(&schema, &json!("nope")),
            Err(vec!["/: expected object, got string".to_string()])
        );
        // Integers are numbers.
        assert!(validate(&json!({"type": "number"}), &json!(3)).is_ok());
    }
}
