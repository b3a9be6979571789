//! capsad itself: what it runs (`info`), its disk (`df`), and what it can
//! let go of (`prune`); with the image maintenance verbs, `tag` and
//! `prune`.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use capsa_api::{DiskUsageView, ImageView, PruneView, SystemInfoView, TagRequest};

use super::{blocking, Reply};
use crate::errors::store_error;
use crate::groups::Daemon;
use crate::tenants::Caller;

pub(super) async fn info(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
) -> Reply<SystemInfoView> {
    blocking(move || daemon.info(&caller)).await.map(Json)
}

pub(super) async fn disk_usage(State(daemon): State<Arc<Daemon>>) -> Reply<DiskUsageView> {
    blocking(move || daemon.disk_usage()).await.map(Json)
}

pub(super) async fn prune(State(daemon): State<Arc<Daemon>>) -> Reply<PruneView> {
    blocking(move || daemon.prune_system()).await.map(Json)
}

pub(super) async fn prune_images(State(daemon): State<Arc<Daemon>>) -> Reply<PruneView> {
    blocking(move || daemon.prune_images()).await.map(Json)
}

pub(super) async fn tag_image(
    State(daemon): State<Arc<Daemon>>,
    Json(request): Json<TagRequest>,
) -> Reply<ImageView> {
    blocking(move || {
        let source = daemon
            .images
            .summary(&request.source)
            .map_err(store_error)?;
        daemon
            .images
            .retag(&request.target, &source.manifest_digest)
            .map_err(store_error)?;
        let tagged = daemon
            .images
            .summary(&request.target)
            .map_err(store_error)?;
        Ok(super::images::view_of(tagged))
    })
    .await
    .map(Json)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use capsa_api::{DiskUsageView, ImageView, PruneView, SystemInfoView};
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use super::super::images::tests::layout;
    use super::super::router;
    use super::super::tests::daemon;

    async fn ask(
        router: &axum::Router,
        method: &str,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn tag_df_info_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let router = router(daemon(dir.path()));
        let image = dir.path().join("image");
        layout(&image, &[("etc/motd", b"hello")]);
        let (status, _) = ask(
            &router,
            "POST",
            "/v1/images/import",
            json!({"path": image, "name": "app"}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, tagged) = ask(
            &router,
            "POST",
            "/v1/images/tag",
            json!({"source": "app", "target": "app:v2"}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{tagged}");
        let tagged: ImageView = serde_json::from_value(tagged).unwrap();
        let (_, listed) = ask(&router, "GET", "/v1/images", Value::Null).await;
        let listed: Vec<ImageView> = serde_json::from_value(listed).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(
            listed.iter().all(|i| i.digest == tagged.digest),
            "{listed:?}"
        );
        let (status, missing) = ask(
            &router,
            "POST",
            "/v1/images/tag",
            json!({"source": "nothing", "target": "x"}),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");

        let spec = json!({"name": "web", "containers": [{"name": "main", "image": "app:v2"}]});
        let (status, _) = ask(&router, "POST", "/v1/groups", spec).await;
        assert_eq!(status, StatusCode::OK);
        let (_, df) = ask(&router, "GET", "/v1/system/df", Value::Null).await;
        let df: DiskUsageView = serde_json::from_value(df).unwrap();
        assert_eq!((df.images, df.groups, df.volumes), (2, 1, 0));
        assert!(df.image_bytes > 0 && df.group_bytes > 0, "{df:?}");
        let (_, info) = ask(&router, "GET", "/v1/system/info", Value::Null).await;
        let info: SystemInfoView = serde_json::from_value(info).unwrap();
        assert_eq!((info.groups, info.running, info.images), (1, 0, Some(2)));
        assert!(info.tenant.is_none() && info.quota.is_none());

        // The image a group names is kept; the other name goes.
        let (status, pruned) = ask(&router, "POST", "/v1/images/prune", Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{pruned}");
        let pruned: PruneView = serde_json::from_value(pruned).unwrap();
        assert_eq!(pruned.images, vec!["app:latest".to_string()]);
        // The group does not run: a system prune deletes it, then its image.
        let (_, pruned) = ask(&router, "POST", "/v1/system/prune", Value::Null).await;
        let pruned: PruneView = serde_json::from_value(pruned).unwrap();
        assert_eq!(pruned.groups, vec!["web".to_string()]);
        assert_eq!(pruned.images, vec!["app:v2".to_string()]);
        assert!(pruned.bytes_freed > 0, "{pruned:?}");
        let (_, df) = ask(&router, "GET", "/v1/system/df", Value::Null).await;
        let df: DiskUsageView = serde_json::from_value(df).unwrap();
        assert_eq!((df.images, df.groups), (0, 0));
    }
}
