//! Labels and annotations the operator puts on what it creates.

/// `app.kubernetes.io/name` of model pods and Services.
pub const APP_NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance`: the Model's name.
pub const APP_INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/component`.
pub const APP_COMPONENT: &str = "app.kubernetes.io/component";
/// `app.kubernetes.io/managed-by`.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of managed-by.
pub const MANAGER: &str = "strata-operator";
/// The Model a pod serves.
pub const MODEL: &str = "strata.ai/model";
/// The GPUPool a pod was placed from.
pub const POOL: &str = "strata.ai/pool";
/// Hash of the pod template (Model spec parts plus pool overrides).
pub const TEMPLATE_HASH: &str = "strata.ai/template-hash";
/// GPUs a pod requests (annotation, for readers that do not parse resources).
pub const GPUS: &str = "strata.ai/gpus";
/// Field manager for everything the operator applies.
pub const FIELD_MANAGER: &str = "strata-operator";
