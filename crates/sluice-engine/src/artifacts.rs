//! The built-in artifact tools: create a table, a chart or a markdown document, and update an
//! existing artifact (each update is a new version; every version is kept).
//!
//! A tool publishes the artifact through its [`ToolContext`]; the run's task appends
//! `artifact_final` and stores the version. The tools check what a JSON Schema cannot say (every
//! row as wide as the columns, every series as long as the labels) and answer errors the model can
//! act on.

use std::sync::Arc;

use serde_json::{Value, json};
use sluice_protocol::api::{ArtifactKind, ArtifactStatus, ArtifactView};
use sluice_providers::ToolSpec;
use sluice_store::Store;

use crate::tools::{Tool, ToolContext, ToolFuture};
use crate::{new_id, now_ms};

/// The four artifact tools, reading earlier versions from `store`.
pub fn builtin(store: Arc<dyn Store>) -> Vec<Arc<dyn Tool>> {
    vec![
        Arc::new(Create(ArtifactKind::Table)),
        Arc::new(Create(ArtifactKind::Chart)),
        Arc::new(Create(ArtifactKind::Document)),
        Arc::new(Update { store }),
    ]
}

const CELL: &str = r#"{"type": ["string", "number", "boolean", "null"]}"#;

fn cell_schema() -> Value {
    serde_json::from_str(CELL).unwrap_or_default()
}

fn table_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1},
            "columns": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "rows": {"type": "array", "items": {"type": "array", "items": cell_schema()}}
        },
        "required": ["title", "columns", "rows"],
        "additionalProperties": false
    })
}

fn chart_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1},
            "chart_type": {"enum": ["bar", "line", "area", "scatter", "pie"]},
            "labels": {"type": "array", "items": {"type": ["string", "number"]}, "minItems": 1},
            "series": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "values": {"type": "array", "items": {"type": "number"}}
                    },
                    "required": ["name", "values"]
                }
            }
        },
        "required": ["title", "chart_type", "labels", "series"],
        "additionalProperties": false
    })
}

fn document_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1},
            "markdown": {"type": "string"}
        },
        "required": ["title", "markdown"],
        "additionalProperties": false
    })
}

/// The artifact's `data` from the tool arguments, checked for what the schema cannot say.
pub fn data_of(kind: ArtifactKind, args: &Value) -> Result<Value, String> {
    match kind {
        ArtifactKind::Table => {
            let columns = args["columns"].as_array().map(Vec::len).unwrap_or(0);
            let rows = args["rows"].as_array().cloned().unwrap_or_default();
            for (i, row) in rows.iter().enumerate() {
                let width = row.as_array().map(Vec::len).unwrap_or(0);
                if width != columns {
                    return Err(format!(
                        "/rows/{i}: has {width} cells but there are {columns} columns"
                    ));
                }
            }
            Ok(json!({"columns": args["columns"], "rows": rows}))
        }
        ArtifactKind::Chart => {
            let labels = args["labels"].as_array().map(Vec::len).unwrap_or(0);
            let series = args["series"].as_array().cloned().unwrap_or_default();
            for (i, s) in series.iter().enumerate() {
                let n = s["values"].as_array().map(Vec::len).unwrap_or(0);
                if n != labels {
                    return Err(format!(
                        "/series/{i}/values: has {n} values but there are {labels} labels"
                    ));
                }
            }
            if args["chart_type"] == "pie" && series.len() != 1 {
                return Err("/series: a pie chart has exactly one series".into());
            }
            Ok(
                json!({"chart_type": args["chart_type"], "labels": args["labels"], "series": series}),
            )
        }
        ArtifactKind::Document => Ok(json!({"markdown": args["markdown"]})),
    }
}

/// The tool that creates an artifact of one kind.
struct Create(ArtifactKind);

impl Tool for Create {
    fn spec(&self) -> ToolSpec {
        let (name, description, parameters) = match self.0 {
            ArtifactKind::Table => (
                "create_table",
                "Show the user a table (it can be downloaded as CSV). Rows are arrays of cells, one per column.",
                table_schema(),
            ),
            ArtifactKind::Chart => (
                "create_chart",
                "Show the user a chart: bar, line, area, scatter or pie, from labels and named series of numbers.",
                chart_schema(),
            ),
            ArtifactKind::Document => (
                "create_document",
                "Show the user a markdown document (a report, a plan, a letter) beside the conversation.",
                document_schema(),
            ),
        };
        ToolSpec {
            name: name.into(),
            description: description.into(),
            parameters,
        }
    }

    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture {
        let kind = self.0;
        Box::pin(async move {
            let data = data_of(kind, &args)?;
            let artifact = ArtifactView {
                id: ctx.artifact_id.clone().unwrap_or_else(new_id),
                thread_id: ctx.thread_id.to_string(),
                run_id: ctx.run_id.to_string(),
                kind,
                title: args["title"].as_str().unwrap_or_default().to_string(),
                version: 1,
                status: ArtifactStatus::Final,
                data,
                created_at: now_ms(),
            };
            let result = json!({"artifact_id": artifact.id, "kind": kind.as_str(), "version": 1});
            ctx.artifact(artifact).await;
            Ok(result)
        })
    }
}

/// Replaces parts of an existing artifact, making a new version.
struct Update {
    store: Arc<dyn Store>,
}

impl Tool for Update {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "update_artifact".into(),
            description: "Change an artifact made earlier in this conversation: give its id and the fields to \
                replace (title; for a table columns/rows, or append_rows; for a chart chart_type/labels/series; \
                for a document markdown). Each update is a new version."
                .into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "artifact_id": {"type": "string"},
                    "title": {"type": "string", "minLength": 1},
                    "columns": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "array", "items": cell_schema()}},
                    "append_rows": {"type": "array", "items": {"type": "array", "items": cell_schema()}},
                    "chart_type": {"enum": ["bar", "line", "area", "scatter", "pie"]},
                    "labels": {"type": "array", "items": {"type": ["string", "number"]}},
                    "series": {"type": "array", "items": {"type": "object"}},
                    "markdown": {"type": "string"}
                },
                "required": ["artifact_id"],
                "additionalProperties": false
            }),
        }
    }

    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture {
        let store = self.store.clone();
        Box::pin(async move {
            let id = args["artifact_id"].as_str().unwrap_or_default().to_string();
            let current = store
                .get_artifact(ctx.owner.to_string(), id.clone(), None)
                .await
                .map_err(|e| format!("reading the artifact failed: {e}"))?
                .filter(|a| *a.thread_id == *ctx.thread_id)
                .ok_or_else(|| format!("there is no artifact {id:?} in this conversation"))?;
            // The current fields, overlaid with what the call replaces.
            let mut merged = current.data.clone();
            merged["title"] = json!(current.title);
            if let (Some(obj), Some(changes)) = (merged.as_object_mut(), args.as_object()) {
                for (k, v) in changes {
                    if k != "artifact_id" && k != "append_rows" {
                        obj.insert(k.clone(), v.clone());
                    }
                }
            }
            if let Some(extra) = args["append_rows"].as_array() {
                if current.kind != ArtifactKind::Table {
                    return Err("append_rows only applies to tables".into());
                }
                if let Some(rows) = merged["rows"].as_array_mut() {
                    rows.extend(extra.iter().cloned());
                }
            }
            let data = data_of(current.kind, &merged)?;
            let version = current.version + 1;
            let artifact = ArtifactView {
                title: merged["title"]
                    .as_str()
                    .unwrap_or(&current.title)
                    .to_string(),
                run_id: ctx.run_id.to_string(),
                version,
                status: ArtifactStatus::Final,
                data,
                created_at: now_ms(),
                ..current
            };
            let result = json!({"artifact_id": artifact.id, "kind": artifact.kind.as_str(), "version": version});
            ctx.artifact(artifact).await;
            Ok(result)
        })
    }
}

/// The kind of artifact a tool creates, for the tools whose arguments are shown while written.
pub fn creates(tool: &str) -> Option<ArtifactKind> {
    match tool {
        "create_table" => Some(ArtifactKind::Table),
        "create_chart" => Some(ArtifactKind::Chart),
        "create_document" => Some(ArtifactKind::Document),
        _ => None,
    }
}

/// What can be shown of an artifact from the arguments written so far (read with
/// [`crate::partial_json`]): a table's complete rows, a chart's series so far, a document's text so far.
pub fn intermediate_data(kind: ArtifactKind, partial: &Value) -> Value {
    match kind {
        ArtifactKind::Table => {
            let columns: Vec<Value> = partial["columns"]
                .as_array()
                .map(|c| c.iter().filter(|v| v.is_string()).cloned().collect())
                .unwrap_or_default();
            let rows: Vec<Value> = partial["rows"]
                .as_array()
                .map(|rows| {
                    rows.iter()
                        .filter(|r| {
                            r.as_array()
                                .is_some_and(|r| !columns.is_empty() && r.len() == columns.len())
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            json!({"columns": columns, "rows": rows})
        }
        ArtifactKind::Chart => json!({
            "chart_type": partial.get("chart_type").cloned().unwrap_or(Value::Null),
            "labels": partial.get("labels").cloned().unwrap_or(json!([])),
            "series": partial.get("series").cloned().unwrap_or(json!([])),
        }),
        ArtifactKind::Document => {
            json!({"markdown": partial["markdown"].as_str().unwrap_or_default()})
        }
    }
}

/// A table as CSV (RFC 4180: fields with commas, quotes or line breaks are quoted).
pub fn table_csv(data: &Value) -> String {
    fn field(v: &Value) -> String {
        let s = match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    }
    let mut out = String::new();
    let line = |cells: &[Value]| cells.iter().map(field).collect::<Vec<_>>().join(",");
    out.push_str(&line(
        data["columns"].as_array().map(Vec::as_slice).unwrap_or(&[]),
    ));
    out.push_str("\r\n");
    for row in data["rows"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push_str(&line(row.as_array().map(Vec::as_slice).unwrap_or(&[])));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_charts_are_checked_and_csv_is_quoted() {
        let ok = json!({"title": "t", "columns": ["a", "b"], "rows": [["x, y", 1], ["say \"hi\"", null]]});
        let data = data_of(ArtifactKind::Table, &ok).expect("valid");
        assert_eq!(
            table_csv(&data),
            "a,b\r\n\"x, y\",1\r\n\"say \"\"hi\"\"\",\r\n"
        );
        let ragged = json!({"title": "t", "columns": ["a", "b"], "rows": [["x"]]});
        assert_eq!(
            data_of(ArtifactKind::Table, &ragged),
            Err("/rows/0: has 1 cells but there are 2 columns".into())
        );
        let chart = json!({"title": "c", "chart_type": "pie", "labels": ["a", "b"], "series": [{"name": "s", "values": [1, 2]}, {"name": "t", "values": [1, 2]}]});
        assert!(data_of(ArtifactKind::Chart, &chart).is_err());
        assert!(crate::schema::validate(&chart_schema(), &chart).is_ok());
    }
}
