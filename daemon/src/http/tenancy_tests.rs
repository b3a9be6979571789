//! The tenants' API (the TLS listener's router, without the TLS): tokens,
//! what each tenant sees, what it may not do, and its quota.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use capsa_api::{ApiError, ErrorCode, GroupView, VersionView, VolumeView};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use super::images::tests::layout;
use super::tests::daemon;
use super::{router, tenant_router};
use crate::tenants::Tenants;

struct Api {
    tenants: Router,
    admin: Router,
}

impl Api {
    async fn ask(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        let router = match token {
            Some("admin") => &self.admin,
            Some(token) => {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
                &self.tenants
            }
            None => &self.tenants,
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let response = router
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn error(value: Value) -> ApiError {
    serde_json::from_value(value).unwrap()
}

fn api(dir: &std::path::Path) -> Api {
    let digest = |token: &str| hex::encode(Sha256::digest(token.as_bytes()));
    let tenants = Tenants::parse(&format!(
        "[[tenant]]\nname = \"alice\"\ntoken-sha256 = \"{}\"\n[tenant.quota]\ngroups = 2\nvcpus = 3\nvolume-mib = 100\n\n[[tenant]]\nname = \"bob\"\ntoken-sha256 = \"{}\"\n",
        digest("alice-token"),
        digest("bob-token")
    ))
    .unwrap();
    let daemon = daemon(dir);
    Api {
        tenants: tenant_router(daemon.clone(), Arc::new(tenants)),
        admin: router(daemon),
    }
}

fn group(name: &str, cpus: u8) -> Value {
    json!({"name": name, "cpus": cpus, "containers": [{"name": "main", "image": "app"}]})
}

#[tokio::test]
async fn a_request_without_a_known_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let api = api(dir.path());
    for token in [None, Some("wrong"), Some("")] {
        let (status, answer) = api.ask(token, "GET", "/v1/groups", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(error(answer).code, ErrorCode::Unauthorized);
    }
    let (status, answer) = api
        .ask(Some("alice-token"), "GET", "/v1/version", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let version: VersionView = serde_json::from_value(answer).unwrap();
    assert_eq!(version.tenant.as_deref(), Some("alice"));
    let (_, answer) = api.ask(Some("admin"), "GET", "/v1/version", None).await;
    let version: VersionView = serde_json::from_value(answer).unwrap();
    assert_eq!(version.tenant, None);
}

#[tokio::test]
async fn a_tenant_sees_and_touches_only_what_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let api = api(dir.path());
    let image = dir.path().join("image");
    layout(&image, &[("etc/motd", b"hello")]);
    let import = json!({"path": image, "name": "app"});
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/images/import",
            Some(import.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(error(answer).code, ErrorCode::Forbidden);
    let (status, _) = api
        .ask(Some("admin"), "POST", "/v1/images/import", Some(import))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = api
        .ask(Some("bob-token"), "DELETE", "/v1/images?name=app", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, _) = api.ask(Some("bob-token"), "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for (method, path, body) in [
        (
            "POST",
            "/v1/images/tag",
            json!({"source": "app", "target": "busybox"}),
        ),
        ("POST", "/v1/images/prune", json!({})),
        (
            "POST",
            "/v1/images/push",
            json!({"name": "app", "target": "reg.example/x"}),
        ),
        ("POST", "/v1/system/prune", json!({})),
        ("GET", "/v1/system/df", json!({})),
        // A name of the tenant's choosing for what it pulls.
        (
            "POST",
            "/v1/images/pull",
            json!({"reference": "evil/app", "name": "busybox"}),
        ),
    ] {
        let (status, answer) = api.ask(Some("bob-token"), method, path, Some(body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
    }

    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/groups",
            Some(group("web", 1)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = api
        .ask(
            Some("admin"),
            "POST",
            "/v1/groups",
            Some(group("admins", 1)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // Bob: alice's group answers as a group that does not exist.
    let (missing_status, missing) = api
        .ask(Some("bob-token"), "GET", "/v1/groups/nothing-here", None)
        .await;
    for path in ["/v1/groups/web", "/v1/groups/admins"] {
        let (status, answer) = api.ask(Some("bob-token"), "GET", path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(missing_status, StatusCode::NOT_FOUND);
        let named = path.rsplit('/').next().unwrap();
        assert_eq!(
            error(answer).message,
            error(missing.clone())
                .message
                .replace("nothing-here", named)
        );
    }
    for (method, path) in [
        ("DELETE", "/v1/groups/web"),
        ("POST", "/v1/groups/web/start"),
        ("POST", "/v1/groups/web/stop"),
        ("GET", "/v1/groups/web/containers/main/logs"),
        ("POST", "/v1/groups/web/containers/main/exec"),
        ("POST", "/v1/groups/web/containers/main/attach"),
        ("POST", "/v1/groups/web/containers/main/kill"),
    ] {
        let (status, _) = api.ask(Some("bob-token"), method, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let (_, listed) = api.ask(Some("bob-token"), "GET", "/v1/groups", None).await;
    assert_eq!(listed, json!([]));
    let (_, listed) = api
        .ask(Some("alice-token"), "GET", "/v1/groups", None)
        .await;
    let listed: Vec<GroupView> = serde_json::from_value(listed).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "web");
    let (_, listed) = api.ask(Some("admin"), "GET", "/v1/groups", None).await;
    let listed: Vec<GroupView> = serde_json::from_value(listed).unwrap();
    assert_eq!(listed.len(), 2);
    let (status, _) = api
        .ask(Some("alice-token"), "GET", "/v1/groups/web", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, info) = api
        .ask(Some("alice-token"), "GET", "/v1/system/info", None)
        .await;
    let info: capsa_api::SystemInfoView = serde_json::from_value(info).unwrap();
    assert_eq!(info.tenant.as_deref(), Some("alice"));
    assert_eq!((info.groups, info.vcpus, info.images), (1, 1, None));
    assert_eq!(info.quota.and_then(|q| q.groups), Some(2));

    // Volumes likewise.
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/volumes",
            Some(json!({"name": "data", "sizeMib": 64})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, _) = api
        .ask(Some("bob-token"), "DELETE", "/v1/volumes/data", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = api.ask(Some("bob-token"), "GET", "/v1/volumes", None).await;
    assert_eq!(listed, json!([]));
    // Bob's group may not mount alice's volume.
    let mut with_volume = group("thief", 1);
    with_volume["volumes"] = json!([{"name": "v", "persistent": {"volume": "data"}}]);
    let (status, answer) = api
        .ask(Some("bob-token"), "POST", "/v1/groups", Some(with_volume))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (_, listed) = api
        .ask(Some("alice-token"), "GET", "/v1/volumes", None)
        .await;
    let listed: Vec<VolumeView> = serde_json::from_value(listed).unwrap();
    assert_eq!(listed.len(), 1);

    // A deleted group's name, made again by the admin, is not alice's.
    let (status, _) = api
        .ask(Some("alice-token"), "DELETE", "/v1/groups/web", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .ask(Some("admin"), "POST", "/v1/groups", Some(group("web", 1)))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .ask(Some("alice-token"), "GET", "/v1/groups/web", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_quota_refusal_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let api = api(dir.path());
    let image = dir.path().join("image");
    layout(&image, &[("etc/motd", b"hello")]);
    let import = json!({"path": image, "name": "app"});
    api.ask(Some("admin"), "POST", "/v1/images/import", Some(import))
        .await;
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/groups",
            Some(group("one", 2)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/groups",
            Some(group("two", 2)),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let refusal = error(answer);
    assert_eq!(refusal.code, ErrorCode::QuotaExceeded);
    assert_eq!(
        refusal.details,
        vec!["vcpus: 2 held and 2 asked for, above the quota of 3".to_string()]
    );
    let (status, _) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/groups",
            Some(group("two", 1)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/groups",
            Some(group("three", 1)),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    // Volumes: 100 MiB in all.
    let volume = |name: &str, size: u64| json!({"name": name, "sizeMib": size});
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/volumes",
            Some(volume("a", 64)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/volumes",
            Some(volume("b", 64)),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, answer) = api
        .ask(
            Some("alice-token"),
            "POST",
            "/v1/volumes/a/grow",
            Some(json!({"sizeMib": 128})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(error(answer).code, ErrorCode::QuotaExceeded);
    // Bob has no quota; the admin has none either.
    let (status, _) = api
        .ask(
            Some("bob-token"),
            "POST",
            "/v1/volumes",
            Some(volume("b", 64)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}
