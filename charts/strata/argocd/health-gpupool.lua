-- Argo CD health of a Strata GPUPool (strata.ai/v1alpha1, cluster-scoped),
-- from the conditions the operator writes (docs/gitops.md):
--   Progressing  no status yet, or status.observedGeneration behind
--                metadata.generation
--   Degraded     ReconcileError True; Ready False: no node matches the
--                nodeSelector (NoNodes) or none can take replicas
--                (NoSchedulableNodes)
--   Healthy      Ready True: schedulable nodes with GPUs
-- Argo CD runs it with gopher-lua (Lua 5.1) and only the base, table and
-- package libraries: no string or math functions here.
local hs = {}

local function find(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = tostring(c.reason or c.type)
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. tostring(c.message)
  end
  return text
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Strata operator to report status"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Strata operator to observe generation " .. tostring(generation)
  return hs
end

local reconcileError = find(status.conditions, "ReconcileError")
if reconcileError ~= nil and reconcileError.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(reconcileError)
  return hs
end
local ready = find(status.conditions, "Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
hs.message = describe(ready)
return hs
