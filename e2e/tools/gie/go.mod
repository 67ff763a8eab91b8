module strata.ai/e2e/tools/gie

go 1.26.0

// Not built: e2e/tools/build.sh takes the InferencePool CRD from this
// module's source (config/crd/bases/), its hash pinned by go.sum.
require sigs.k8s.io/gateway-api-inference-extension v1.5.0
