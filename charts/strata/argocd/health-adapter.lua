-- Argo CD health of a Strata Adapter (strata.ai/v1alpha1), from its phase
-- and the conditions the operator writes (docs/gitops.md):
--   Progressing  no status yet, or status.observedGeneration behind
--                metadata.generation; phase Pending (the Model has no
--                ready replica) or Loading; being deleted (unloading)
--   Degraded     ReconcileError True; Degraded True; phase Degraded
--                (loaded on some replicas, failing or no room on others)
--                or Failed (loaded nowhere)
--   Healthy      Ready True: loaded on every replica that should carry it
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

if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Unloading the adapter from the replicas before deletion"
  return hs
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
local degraded = find(status.conditions, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
local ready = find(status.conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end
if status.phase == "Degraded" or status.phase == "Failed" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Phase " .. tostring(status.phase)
end
return hs
