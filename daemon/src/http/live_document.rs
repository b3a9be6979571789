//! docs/api.json against live answers (its schemas are generated from
//! capsa-api's types: `capsa_api::openapi`): requests to the real router (a
//! daemon on a temporary root, an imported image, a created group), each
//! answer checked against the schema the document gives for its path,
//! method and status. The document is OpenAPI 3.0, whose schemas are not
//! JSON Schema (`nullable`), so the check is the subset the document
//! uses; an object's fields must all be documented (where it names its
//! properties and says nothing of others), so that a field added to a
//! type and not to the document fails here.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use super::images::tests::layout;
use super::router;
use super::tests::daemon;

/// What `value` breaks of `schema` (a schema of `document`), at `at`.
fn check(schema: &Value, value: &Value, document: &Value, at: &str, problems: &mut Vec<String>) {
    // schemars puts `nullable` beside a `$ref` for an optional object.
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        match document.pointer(reference.trim_start_matches('#')) {
            Some(target) => check(target, value, document, at, problems),
            None => problems.push(format!("{at}: {reference} is not in the document")),
        }
        return;
    }
    if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
        let fits = variants.iter().any(|variant| {
            let mut found = Vec::new();
            check(variant, value, document, at, &mut found);
            found.is_empty()
        });
        if !fits {
            problems.push(format!("{at}: fits none of its oneOf"));
        }
        return;
    }
    let Some(kind) = schema.get("type").and_then(Value::as_str) else {
        return;
    };
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            problems.push(format!("{at}: null, where the document says {kind}"));
        }
        return;
    }
    let fits = match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !fits {
        problems.push(format!("{at}: {value} is not {kind}"));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            problems.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(minimum), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < minimum {
            problems.push(format!("{at}: {n} is below {minimum}"));
        }
    }
    if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
        for (i, item) in values.iter().enumerate() {
            check(items, item, document, &format!("{at}[{i}]"), problems);
        }
    }
    let Some(fields) = value.as_object() else {
        return;
    };
    let properties = schema.get("properties").and_then(Value::as_object);
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !fields.contains_key(name) {
            problems.push(format!("{at}: required {name} is missing"));
        }
    }
    for (name, field) in fields {
        let at = format!("{at}.{name}");
        match (
            properties.and_then(|p| p.get(name)),
            schema.get("additionalProperties"),
        ) {
            (Some(property), _) => check(property, field, document, &at, problems),
            (None, Some(Value::Bool(false))) => problems.push(format!("{at}: not allowed")),
            (None, Some(Value::Bool(true))) => {}
            (None, Some(other)) => check(other, field, document, &at, problems),
            (None, None) if properties.is_some() => {
                problems.push(format!("{at}: not in the document"))
            }
            (None, None) => {}
        }
    }
}

/// The router, the document, and what its answers broke of it so far.
struct Live {
    router: axum::Router,
    document: Value,
    problems: Vec<String>,
}

impl Live {
    /// Sends a request and checks its answer against the document's
    /// schema for `template` (the documented path), `method` and the
    /// status.
    async fn ask(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.map(|b| b.to_string()).unwrap_or_default()))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {bytes:?}"));
        let responses = &self.document["paths"][template][method.to_ascii_lowercase()]["responses"];
        let documented = match responses.get(status.as_str()) {
            Some(documented) => documented,
            None => &responses["default"],
        };
        match documented.pointer("/content/application~1json/schema") {
            Some(schema) => check(
                schema,
                &value,
                &self.document,
                &format!("{method} {path} ({status})"),
                &mut self.problems,
            ),
            None => self.problems.push(format!(
                "{method} {template}: no JSON schema documented for {status}"
            )),
        }
        (status, value)
    }
}

#[tokio::test]
async fn live_answers_fit_the_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let mut live = Live {
        router: router(daemon(dir.path())),
        document: serde_json::from_str(include_str!("../../../docs/api.json")).unwrap(),
        problems: Vec::new(),
    };
    let image = dir.path().join("image");
    layout(&image, &[("etc/motd", b"hello")]);
    let import = serde_json::json!({"path": image, "name": "app"});
    let (status, answer) = live
        .ask(
            "POST",
            "/v1/images/import",
            "/v1/images/import",
            Some(import),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let spec = serde_json::json!({
        "name": "web",
        "labels": {"team": "a"},
        "memoryMib": 192,
        "restartPolicy": "OnFailure",
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "containers": [{
            "name": "main", "image": "app", "env": {"A": "1"}, "stdin": true,
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        }],
    });
    let (status, created) = live
        .ask("POST", "/v1/groups", "/v1/groups", Some(spec.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    for (template, path) in [
        ("/v1/groups/{name}", "/v1/groups/web"),
        ("/v1/groups", "/v1/groups"),
        ("/v1/images", "/v1/images"),
        ("/v1/volumes", "/v1/volumes"),
        ("/v1/version", "/v1/version"),
        ("/v1/system/info", "/v1/system/info"),
        ("/v1/system/df", "/v1/system/df"),
        // Errors: no such group or container, a container not running.
        ("/v1/groups/{name}", "/v1/groups/nope"),
        (
            "/v1/groups/{name}/containers/{container}/top",
            "/v1/groups/web/containers/nope/top",
        ),
        (
            "/v1/groups/{name}/containers/{container}/top",
            "/v1/groups/web/containers/main/top",
        ),
    ] {
        live.ask("GET", template, path, None).await;
    }
    let bad = serde_json::json!({"name": "Bad!", "containers": []});
    let (status, _) = live
        .ask("POST", "/v1/groups", "/v1/groups", Some(bad))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = live
        .ask(
            "POST",
            "/v1/groups/{name}/containers/{container}/kill",
            "/v1/groups/web/containers/main/kill",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // What was created is what inspect gives back.
    let (_, inspected) = live
        .ask("GET", "/v1/groups/{name}", "/v1/groups/web", None)
        .await;
    let given: capsa_api::GroupSpec = serde_json::from_value(spec).unwrap();
    let kept: capsa_api::GroupSpec = serde_json::from_value(inspected["spec"].clone()).unwrap();
    assert_eq!(kept, given);
    let (status, _) = live
        .ask("DELETE", "/v1/groups/{name}", "/v1/groups/web", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(live.problems.is_empty(), "{}", live.problems.join("\n"));
}

#[test]
fn the_check_finds_drift() {
    let document = serde_json::json!({"components": {"schemas": {"Thing": {
        "type": "object", "required": ["a"],
        "properties": {"a": {"type": "integer", "minimum": 0}, "b": {"type": "string", "nullable": true}},
    }}}});
    let thing = serde_json::json!({"$ref": "#/components/schemas/Thing"});
    let found = |value: Value| {
        let mut problems = Vec::new();
        check(&thing, &value, &document, "t", &mut problems);
        problems
    };
    assert!(found(serde_json::json!({"a": 1, "b": null})).is_empty());
    assert_eq!(
        found(serde_json::json!({"b": "x"})),
        ["t: required a is missing"]
    );
    assert_eq!(found(serde_json::json!({"a": -1})), ["t.a: -1 is below 0"]);
    assert_eq!(
        found(serde_json::json!({"a": 1, "c": true})),
        ["t.c: not in the document"]
    );
    assert_eq!(
        found(serde_json::json!({"a": "1"})),
        ["t.a: \"1\" is not integer"]
    );
}
