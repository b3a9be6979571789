//! docs/api.json's schemas, generated from these types (schemars, in
//! OpenAPI 3.0's form: `nullable`, `#/components/schemas/`): the
//! document's `components.schemas` is exactly this, and a test keeps it
//! so (`CAPSA_BLESS=1 cargo test -p capsa-api` writes it). The paths are
//! written by hand; the daemon's tests check them against its router and
//! its live answers against these schemas.

use schemars::gen::SchemaSettings;
use serde_json::Value;

use crate::exec::ExecRequest;
use crate::*;

/// Every schema the API's paths name, and the ones they hold.
pub fn schemas() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    generator.subschema_for::<GroupSpec>();
    generator.subschema_for::<GroupView>();
    generator.subschema_for::<ApiError>();
    generator.subschema_for::<ImageView>();
    generator.subschema_for::<ImportRequest>();
    generator.subschema_for::<PullRequest>();
    generator.subschema_for::<PushRequest>();
    generator.subschema_for::<PushView>();
    generator.subschema_for::<TagRequest>();
    generator.subschema_for::<PruneView>();
    generator.subschema_for::<DiskUsageView>();
    generator.subschema_for::<SystemInfoView>();
    generator.subschema_for::<LoginRequest>();
    generator.subschema_for::<LoginView>();
    generator.subschema_for::<VersionView>();
    generator.subschema_for::<WaitResponse>();
    generator.subschema_for::<LogLine>();
    generator.subschema_for::<ExecRequest>();
    generator.subschema_for::<GroupStats>();
    generator.subschema_for::<Event>();
    generator.subschema_for::<ProgressEvent<Value>>();
    generator.subschema_for::<VolumeView>();
    generator.subschema_for::<VolumeRequest>();
    generator.subschema_for::<VolumeGrowRequest>();
    generator.subschema_for::<NetworkView>();
    generator.subschema_for::<NetworkRequest>();
    generator.subschema_for::<ProcessView>();
    serde_json::to_value(generator.take_definitions()).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_has_the_generated_schemas() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut document: serde_json::Value = serde_json::from_str(&text).unwrap();
        let generated = super::schemas();
        if std::env::var_os("CAPSA_BLESS").is_some() {
            document["components"]["schemas"] = generated;
            let text = serde_json::to_string_pretty(&document).unwrap() + "\n";
            std::fs::write(&path, text).unwrap();
            return;
        }
        assert!(
            document["components"]["schemas"] == generated,
            "docs/api.json's schemas are not the types' (CAPSA_BLESS=1 cargo test -p capsa-api writes them)"
        );
    }
}
