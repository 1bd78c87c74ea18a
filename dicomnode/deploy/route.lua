-- Auto-routing of whole-thigh CT series from Orthanc to the thigh-muscle volumetry node.
--
-- Orthanc calls OnStableSeries(seriesId, tags, metadata) once a series has received no new
-- instance for "StableAge" seconds (orthanc.json). This script decides, cheaply and from the
-- headers only, whether the series looks like a whole-thigh CT, and if so queues an asynchronous
-- Orthanc job that C-STOREs the whole series to the node's modality ("NodeModality").
--
-- What counts as "looks like a thigh CT" (first rule that applies wins):
--   1. Series Modality must be CT.
--   2. Series that the node itself sent (first instance's RemoteAET in "NodeAets") are never routed
--      back: results are SEG/SR/OT anyway, this guards against loops if a site changes that.
--   3. The first instance must be CT Image Storage, Enhanced CT or Legacy Converted Enhanced CT Image
--      Storage, the classes the node accepts (drops dose reports, secondary captures and other
--      CT-labelled objects), and its ImageType must not say LOCALIZER.
--   4. BodyPartExamined equal to one of "ExcludeBodyParts" (HEAD, CHEST, ...) or a SeriesDescription /
--      ProtocolName containing one of "ExcludeDescriptions" (SCOUT, TOPOGRAM, DOSE, ...) → not routed.
--   5. BodyPartExamined / SeriesDescription / ProtocolName containing one of "ThighHints"
--      (THIGH, LEG, LOWEXM, FEMUR, HIP, ...) → routed.
--   6. Otherwise routed when the estimated z-extent (number of slices × SpacingBetweenSlices or
--      SliceThickness) is at least "MinZExtentMm", or when the extent cannot be estimated.
-- The node applies the exact selection (orientation, spacing, gaps, z-coverage ≥ 250 mm) and
-- records a visible rejection reason for anything routed here that it will not measure; this filter
-- only keeps obviously unrelated traffic off the node, so it errs on the side of routing.
--
-- What happens to the routed series: nothing. It stays in Orthanc (the archive); the node works on
-- its own copy and sends its results (SEG, SR, summary, follow-up SR) back into the same study.
-- A series that receives more instances later becomes stable again and is routed again; the node
-- supersedes the earlier job and, because its output UIDs are deterministic, never duplicates results.
-- A routing job that fails (node down or unreachable) is logged and remembered; it is resubmitted
-- automatically as soon as another routing job to the node succeeds (the node is back), and can
-- always be resubmitted by hand: POST /jobs/<id>/resubmit. Orthanc 1.10 has no Lua timer, so the
-- retry rides on the next successful routing rather than on a clock.
--
-- Settings come from the "ThighRouting" section of the Orthanc configuration, so the same script
-- serves every site; nothing here logs patient names or IDs (Orthanc series IDs are hashes).

local function Settings()
   local all = GetOrthancConfiguration()
   local cfg = all['ThighRouting'] or {}
   return {
      node = cfg['NodeModality'] or 'thighnode',
      nodeAets = cfg['NodeAets'] or { 'THIGHNODE' },
      minZ = tonumber(cfg['MinZExtentMm'] or 200),
      thighHints = cfg['ThighHints'] or { 'THIGH', 'LEG', 'LOWEXM', 'FEMUR', 'HIP' },
      excludeParts = cfg['ExcludeBodyParts'] or { 'HEAD', 'CHEST' },
      excludeDescriptions = cfg['ExcludeDescriptions'] or { 'SCOUT', 'TOPOGRAM', 'LOCALIZER', 'DOSE' },
   }
end

local CT_SOP_CLASSES = {
   ['1.2.840.10008.5.1.4.1.1.2'] = true,    -- CT Image Storage
   ['1.2.840.10008.5.1.4.1.1.2.1'] = true,  -- Enhanced CT Image Storage
   ['1.2.840.10008.5.1.4.1.1.2.2'] = true,  -- Legacy Converted Enhanced CT Image Storage
}

local function Upper(value)
   if value == nil then return '' end
   return string.upper(tostring(value))
end

local function ContainsAny(text, needles)
   for _, needle in ipairs(needles) do
      if string.find(text, string.upper(needle), 1, true) ~= nil then
         return needle
      end
   end
   return nil
end

local function TryGetJson(uri)
   local ok, answer = pcall(RestApiGet, uri, true)
   if not ok or answer == nil or answer == '' then return nil end
   local parsed_ok, parsed = pcall(ParseJson, answer)
   if not parsed_ok then return nil end
   return parsed
end

local function TryGetText(uri)
   local ok, answer = pcall(RestApiGet, uri, true)
   if not ok then return nil end
   return answer
end

local function SliceSpacing(first)
   local spacing = tonumber(first['SpacingBetweenSlices'] or '')
   if spacing == nil or spacing <= 0 then spacing = tonumber(first['SliceThickness'] or '') end
   if spacing == nil or spacing <= 0 then return nil end
   return spacing
end

-- Returns (route: boolean, reason: string). Exposed as a global so tests and admins can call it
-- through /tools/execute-script when remote Lua is enabled.
function ThighRoutingDecision(seriesId, tags)
   local s = Settings()
   local modality = Upper(tags['Modality'])
   if modality ~= 'CT' then
      return false, 'modality ' .. (modality == '' and 'missing' or modality) .. ' is not CT'
   end

   local series = TryGetJson('/series/' .. seriesId)
   if series == nil or series['Instances'] == nil or #series['Instances'] == 0 then
      return false, 'series has no instances'
   end
   local instances = series['Instances']
   local firstId = instances[1]

   local remoteAet = Upper(TryGetText('/instances/' .. firstId .. '/metadata/RemoteAET'))
   for _, aet in ipairs(s.nodeAets) do
      if remoteAet == Upper(aet) then
         return false, 'series was sent by the node itself (' .. remoteAet .. ')'
      end
   end

   local first = TryGetJson('/instances/' .. firstId .. '/simplified-tags') or {}
   local sopClass = tostring(first['SOPClassUID'] or '')
   if not CT_SOP_CLASSES[sopClass] then
      return false, 'SOP class ' .. sopClass .. ' is not CT / Enhanced CT / Legacy Converted Enhanced CT'
   end
   if string.find(Upper(first['ImageType']), 'LOCALIZER', 1, true) ~= nil then
      return false, 'ImageType says LOCALIZER'
   end

   local bodyPart = Upper(tags['BodyPartExamined'] or first['BodyPartExamined'])
   local description = Upper(tags['SeriesDescription']) .. ' ' .. Upper(tags['ProtocolName'] or first['ProtocolName'])
   for _, part in ipairs(s.excludeParts) do
      if bodyPart == Upper(part) then
         return false, 'BodyPartExamined ' .. bodyPart .. ' is not a thigh'
      end
   end
   local excluded = ContainsAny(description, s.excludeDescriptions)
   if excluded ~= nil then
      return false, 'series description/protocol mentions ' .. excluded
   end

   local hint = ContainsAny(bodyPart .. ' ' .. description, s.thighHints)
   if hint ~= nil then
      return true, 'thigh hint ' .. hint
   end

   local spacing = SliceSpacing(first)
   local slices = #instances
   local frames = tonumber(first['NumberOfFrames'] or '')
   if slices == 1 and frames ~= nil then slices = frames end
   if spacing == nil then
      return true, 'no thigh hint and no slice spacing; routed, the node decides'
   end
   local extent = slices * spacing
   if extent >= s.minZ then
      return true, string.format('estimated z-extent %.0f mm >= %.0f mm', extent, s.minZ)
   end
   return false, string.format('no thigh hint and estimated z-extent %.0f mm < %.0f mm', extent, s.minZ)
end

function OnStableSeries(seriesId, tags, metadata)
   local ok, route, reason = pcall(ThighRoutingDecision, seriesId, tags)
   if not ok then
      print('thigh-routing: series ' .. seriesId .. ': decision failed (' .. tostring(route) .. '); not routed')
      return
   end
   if not route then
      print('thigh-routing: series ' .. seriesId .. ' not routed: ' .. reason)
      return
   end
   local s = Settings()
   local request = {}
   request['Resources'] = { seriesId }
   request['Asynchronous'] = true  -- an Orthanc job: Lua events are not blocked while it sends
   -- (numbers are left out on purpose: Lua numbers reach Orthanc as doubles, which it refuses)
   local posted, answer = pcall(RestApiPost, '/modalities/' .. s.node .. '/store', DumpJson(request, true), true)
   if not posted or answer == nil then
      print('thigh-routing: series ' .. seriesId .. ': could not queue the store job to ' .. s.node)
      return
   end
   local job = ParseJson(answer)
   print('thigh-routing: series ' .. seriesId .. ' routed to ' .. s.node .. ' (' .. reason .. '), job '
         .. tostring(job['ID']))
end


-- ---------------------------------------------------------------------------------------------
-- Failed routing jobs: remember them, resubmit once the node has accepted something again.
-- ---------------------------------------------------------------------------------------------
local failedRouting = {}

local function RoutingJob(jobId)
   local job = TryGetJson('/jobs/' .. jobId)
   if job == nil or job['Type'] ~= 'DicomModalityStore' or job['Content'] == nil then return nil end
   local remote = Upper(job['Content']['RemoteAet'])
   for _, aet in ipairs(Settings().nodeAets) do
      if remote == Upper(aet) then return job end
   end
   return nil
end

function OnJobFailure(jobId)
   local job = RoutingJob(jobId)
   if job == nil then return end
   failedRouting[jobId] = true
   print('thigh-routing: job ' .. jobId .. ' to the node failed (' ..
         tostring(job['ErrorDetails'] or job['ErrorDescription']) ..
         '); resubmitted after the next successful routing, or now with POST /jobs/' .. jobId .. '/resubmit')
end

function OnJobSuccess(jobId)
   failedRouting[jobId] = nil
   if RoutingJob(jobId) == nil then return end
   local pending = {}
   for id, _ in pairs(failedRouting) do table.insert(pending, id) end
   for _, id in ipairs(pending) do
      failedRouting[id] = nil
      local ok = pcall(RestApiPost, '/jobs/' .. id .. '/resubmit', '', true)
      print('thigh-routing: the node accepts again; job ' .. id .. (ok and ' resubmitted' or ' could not be resubmitted'))
   end
end
