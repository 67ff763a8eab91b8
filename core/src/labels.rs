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
/// Prefix of the label a replica carries for each adapter loaded on it
/// (`adapter.strata.ai/<adapter-name>: "loaded"`); an Adapter's Service
/// selects on it.
pub const ADAPTER_PREFIX: &str = "adapter.strata.ai/";
/// The value of an adapter label.
pub const ADAPTER_LOADED: &str = "loaded";
/// Finalizer that unloads an Adapter from every replica before it goes.
pub const ADAPTER_FINALIZER: &str = "strata.ai/unload-adapter";
/// Field manager of the energy accountant (status.energy and the pools'
/// power and energy).
pub const ENERGY_FIELD_MANAGER: &str = "strata-energy";
