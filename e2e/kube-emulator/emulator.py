"""A small, stateful Kubernetes API emulator for Stowage's end-to-end tests.

No kube-apiserver can run on the development and CI machines (see the
README, "End-to-end tests"), so the e2e suite runs against this emulator unless
KUBECONFIG names a real cluster. It serves exactly what the operator
(kube-rs), kubectl get / apply --server-side / wait / delete / annotate and the
tests use, with the Kubernetes semantics they rely on:

- discovery (/api, /apis, groups, resource lists with short names and
  categories) for the CRDs given on the command line and a few built-in kinds;
- objects with uid, resourceVersion (one global counter), generation (bumped
  when .spec changes), creationTimestamp, namespaces from the URL;
- create (201), get, list (fieldSelector metadata.name / metadata.namespace),
  PUT, JSON patch (a `test` of a missing path equals null, as in Kubernetes),
  merge patch, server-side apply (creates a missing object; on /status it
  replaces the status owned by the single applying manager), /status that
  changes only .status;
- delete with finalizers (deletionTimestamp, removal when the last finalizer
  goes), watch from a resourceVersion with bookmarks and timeoutSeconds;
- Table output with the CRDs' printer columns for `kubectl get`;
- standard Status errors (NotFound, AlreadyExists, Conflict, Invalid);
- apps/v1 Deployments with their `scale` subresource (autoscaling/v1 Scale:
  spec.replicas, status.selector from spec.selector.matchLabels), Pods, and
  equality label selectors (`a=b`, `a!=b`) on lists;
- with --request-log FILE, one JSON line per request (method, path, query,
  User-Agent): the e2e suite checks the operator's calls against the Helm
  chart's RBAC rules;
- TokenReview and SubjectAccessReview answered from --auth-policy FILE
  (re-read on every review, so a test can grant and revoke): {"tokens":
  {TOKEN: {"username", "uid", "groups", "audiences"}}, "rules": [{"user",
  "verb", "group", "resource", "subresource", "namespace", "names"} or
  {"user", "verb", "nonResourceURL"}]}.

What it does not do (the e2e checks these another way or not at all):
OpenAPI/CEL validation, admission, garbage collection of owned objects,
field-manager conflict detection, set-based label selectors, RBAC,
authentication.

Usage: python emulator.py --crds DIR [--port 0] [--port-file FILE]
"""

import argparse
import asyncio
import copy
import datetime
import json
import pathlib
import uuid

import jsonpatch
import yaml
from aiohttp import web

BUILTIN = [
    # group, version, plural, kind, namespaced, short names, categories, subresources, printer columns
    ("", "v1", "namespaces", "Namespace", False, ["ns"], [], [], []),
    ("", "v1", "secrets", "Secret", True, [], [], [], []),
    ("", "v1", "events", "Event", True, ["ev"], [], [], []),
    ("events.k8s.io", "v1", "events", "Event", True, ["ev"], [], [], []),
    ("", "v1", "pods", "Pod", True, ["po"], [], ["status"], []),
    ("apps", "v1", "deployments", "Deployment", True, ["deploy"], [], ["status", "scale"], []),
    ("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, [], [], [], []),
    ("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", False, [], [], [], []),
]


def now():
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_error(code, reason, message):
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    return web.json_response(body, status=code)


class Resource:
    def __init__(self, group, version, plural, kind, namespaced, short, categories, subresources, columns):
        self.group, self.version, self.plural, self.kind = group, version, plural, kind
        self.namespaced, self.short, self.categories = namespaced, short, categories
        self.subresources, self.columns = subresources, columns
        self.singular = kind.lower()

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version


class Emulator:
    def __init__(self, crd_dir, request_log=None, auth_policy=None):
        self.request_log = open(request_log, "a", buffering=1) if request_log else None
        self.auth_policy = auth_policy
        self.resources = [Resource(*b) for b in BUILTIN]
        for path in sorted(pathlib.Path(crd_dir).glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            spec, names = crd["spec"], crd["spec"]["names"]
            for v in spec["versions"]:
                self.resources.append(Resource(
                    spec["group"], v["name"], names["plural"], names["kind"],
                    spec["scope"] == "Namespaced", names.get("shortNames", []),
                    names.get("categories", []), list(v.get("subresources", {}).keys()),
                    v.get("additionalPrinterColumns", [])))
        self.objects = {}  # (group, plural, namespace, name) -> object
        self.rv = 0
        self.history = []  # (rv, group, plural, event)
        self.changed = asyncio.Condition()

    def find(self, group, version, plural):
        for r in self.resources:
            if (r.group, r.version, r.plural) == (group, version, plural):
                return r
        return None

    # ------------------------------------------------------------ discovery
    def resource_list(self, group, version):
        out = []
        for r in self.resources:
            if (r.group, r.version) != (group, version):
                continue
            out.append({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                        "kind": r.kind, "shortNames": r.short, "categories": r.categories,
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            for sub in r.subresources:
                out.append({"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": out}

    def groups(self):
        seen = {}
        for r in self.resources:
            if r.group and r.version not in seen.get(r.group, []):
                seen.setdefault(r.group, []).append(r.version)
        return [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in seen.items()]

    # ------------------------------------------------------------ storage
    def record(self, r, type_, obj):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, r.group, r.plural, {"type": type_, "object": copy.deepcopy(obj)}))
        if len(self.history) > 20000:
            del self.history[:10000]

    async def notify(self):
        async with self.changed:
            self.changed.notify_all()

    def store(self, r, ns, obj, old=None):
        meta = obj.setdefault("metadata", {})
        key = (r.group, r.plural, ns, meta["name"])
        if old is None:
            meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=now())
            if r.namespaced:
                meta["namespace"] = ns
            obj["apiVersion"], obj["kind"] = r.api_version, r.kind
            self.objects[key] = obj
            self.record(r, "ADDED", obj)
            return obj
        for fixed in ("uid", "creationTimestamp", "namespace", "name"):
            if fixed in old["metadata"]:
                meta[fixed] = old["metadata"][fixed]
        if old["metadata"].get("deletionTimestamp"):
            meta["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        meta["generation"] = old["metadata"].get("generation", 1) + (obj.get("spec") != old.get("spec"))
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[key]
            self.record(r, "DELETED", obj)
            return obj
        self.objects[key] = obj
        self.record(r, "MODIFIED", obj)
        return obj

    # ------------------------------------------------------------ handlers
    def route(self, request):
        parts = [p for p in request.path.split("/") if p]
        if parts[:1] == ["api"]:
            group, rest = "", parts[1:]
        else:
            group, rest = parts[1], parts[2:]
        version, rest = rest[0], rest[1:]
        ns = None
        if len(rest) > 2 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        r = self.find(group, version, plural)
        if r is not None and not r.namespaced and ns is not None:
            r = None
        return r, ns, name, sub

    async def handle(self, request):
        if self.request_log:
            self.request_log.write(json.dumps({
                "method": request.method, "path": request.path, "query": request.query_string,
                "agent": request.headers.get("User-Agent", "")}) + "\n")
        try:
            return await self.serve(request)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError):
            return status_error(415, "UnsupportedMediaType",
                                f"only JSON (and YAML for apply) bodies are understood, not "
                                f"{request.headers.get('Content-Type')}")

    async def serve(self, request):
        parts = [p for p in request.path.split("/") if p]
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-stowage-emulator",
                                      "platform": "linux/amd64"})
        if request.path == "/api":
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if request.path == "/apis":
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": self.groups()})
        if parts[:1] == ["apis"] and len(parts) == 2:
            g = [x for x in self.groups() if x["name"] == parts[1]]
            return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **g[0]}) if g else \
                status_error(404, "NotFound", f"group {parts[1]} not found")
        if (parts[:1] == ["api"] and len(parts) == 2) or (parts[:1] == ["apis"] and len(parts) == 3):
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            return web.json_response(self.resource_list(group, version))
        if parts[:1] not in (["api"], ["apis"]):
            return status_error(404, "NotFound", f"{request.path} not found")
        r, ns, name, sub = self.route(request)
        if r is None:
            return status_error(404, "NotFound", f"the server could not find the requested resource ({request.path})")
        if r.kind == "Namespace" and name and request.method == "GET":
            return web.json_response({"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": name}, "status": {"phase": "Active"}})
        if name is None and request.method == "POST" and r.kind in ("TokenReview", "SubjectAccessReview"):
            return await self.review(request, r)
        if name is None:
            if request.method == "GET":
                if request.query.get("watch") in ("1", "true"):
                    return await self.watch(request, r, ns)
                return self.list(request, r, ns)
            if request.method == "POST":
                return await self.create(request, r, ns)
            return status_error(405, "MethodNotAllowed", request.method)
        key = (r.group, r.plural, ns, name)
        obj = self.objects.get(key)
        if sub == "scale" and r.kind == "Deployment":
            return await self.scale(request, r, ns, name, obj)
        if request.method == "GET":
            return self.reply(request, r, obj) if obj else self.not_found(r, name)
        if request.method == "DELETE":
            return await self.delete(r, key, obj)
        if request.method in ("PUT", "PATCH"):
            return await self.modify(request, r, ns, name, sub, obj)
        return status_error(405, "MethodNotAllowed", request.method)

    def not_found(self, r, name):
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f'{r.plural}.{r.group} "{name}" not found', "reason": "NotFound",
                "details": {"name": name, "group": r.group, "kind": r.plural}, "code": 404}
        return web.json_response(body, status=404)

    def selected(self, request, r, ns):
        fields = dict(s.split("=", 1) for s in request.query.get("fieldSelector", "").split(",") if "=" in s)
        wanted = []  # (key, value, equal?)
        for term in filter(None, request.query.get("labelSelector", "").split(",")):
            if "!=" in term:
                k, v = term.split("!=", 1)
                wanted.append((k.strip(), v.strip(), False))
            elif "=" in term:
                k, v = term.replace("==", "=").split("=", 1)
                wanted.append((k.strip(), v.strip(), True))
        out = []
        for (g, p, ons, oname), obj in self.objects.items():
            if (g, p) != (r.group, r.plural) or (ns is not None and ons != ns):
                continue
            if "metadata.name" in fields and oname != fields["metadata.name"]:
                continue
            if "metadata.namespace" in fields and ons != fields["metadata.namespace"]:
                continue
            labels = obj.get("metadata", {}).get("labels") or {}
            if any((labels.get(k) == v) != eq for k, v, eq in wanted):
                continue
            out.append(obj)
        return out, fields

    def list(self, request, r, ns):
        items, _ = self.selected(request, r, ns)
        if "as=Table" in request.headers.get("Accept", ""):
            return web.json_response(self.table(r, items))
        return web.json_response({"kind": f"{r.kind}List", "apiVersion": r.api_version,
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    def reply(self, request, r, obj, status=200):
        if "as=Table" in request.headers.get("Accept", ""):
            return web.json_response(self.table(r, [obj]), status=status)
        return web.json_response(obj, status=status)

    def table(self, r, items):
        columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0}]
        for c in r.columns:
            columns.append({"name": c["name"], "type": c["type"], "priority": c.get("priority", 0),
                            "format": c.get("format", ""), "description": c.get("description", "")})
        rows = []
        for obj in items:
            cells = [obj["metadata"]["name"]]
            for c in r.columns:
                value = obj
                for step in c["jsonPath"].strip(".").split("."):
                    value = value.get(step) if isinstance(value, dict) else None
                if c["type"] == "date" and value:
                    value = age(value)
                cells.append(value)
            meta = {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                    "creationTimestamp") if k in obj["metadata"]}
            rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                                                    "apiVersion": "meta.k8s.io/v1", "metadata": meta}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.rv)}, "columnDefinitions": columns, "rows": rows}

    async def create(self, request, r, ns):
        obj = await request.json()
        name = obj.get("metadata", {}).get("name")
        if not name:
            return status_error(422, "Invalid", "metadata.name: Required value")
        if (r.group, r.plural, ns, name) in self.objects:
            return status_error(409, "AlreadyExists", f'{r.plural}.{r.group} "{name}" already exists')
        obj = self.store(r, ns, obj)
        await self.notify()
        return self.reply(request, r, obj, status=201)

    async def delete(self, r, key, obj):
        if obj is None:
            return self.not_found(r, key[3])
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = now()
                self.objects[key] = obj
                self.record(r, "MODIFIED", obj)
                await self.notify()
            return web.json_response(obj, status=202)
        del self.objects[key]
        self.record(r, "DELETED", obj)
        await self.notify()
        return web.json_response(obj)

    async def modify(self, request, r, ns, name, sub, old):
        ctype = request.headers.get("Content-Type", "").split(";")[0]
        raw = await request.text()
        body = yaml.safe_load(raw) if ctype == "application/apply-patch+yaml" else json.loads(raw or "null")
        if old is None:
            if ctype == "application/apply-patch+yaml" and sub is None:
                body.setdefault("metadata", {})["name"] = name
                obj = self.store(r, ns, body)
                await self.notify()
                return self.reply(request, r, obj, status=201)
            return self.not_found(r, name)
        current = copy.deepcopy(old)
        try:
            if request.method == "PUT":
                new = body
                if new.get("metadata", {}).get("resourceVersion") not in (None, old["metadata"]["resourceVersion"]):
                    return status_error(409, "Conflict", "the object has been modified; please apply your "
                                                         "changes to the latest version and try again")
            elif ctype == "application/json-patch+json":
                new = apply_json_patch(current, body)
            elif ctype == "application/apply-patch+yaml" and sub == "status":
                new = current
                new["status"] = body.get("status")
            else:  # merge, strategic merge, apply on the main resource
                new = merge(current, body)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            return status_error(422, "Invalid", f"the patch could not be applied: {e}")
        if sub == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            new["status"] = status
        elif "status" in r.subresources:
            new["status"] = old.get("status")
        obj = self.store(r, ns, new, old=old)
        await self.notify()
        return self.reply(request, r, obj)

    # ------------------------------------------------------------ reviews
    def policy(self):
        if not self.auth_policy:
            return {"tokens": {}, "rules": []}
        try:
            return json.loads(pathlib.Path(self.auth_policy).read_text())
        except (OSError, json.JSONDecodeError):
            return {"tokens": {}, "rules": []}

    async def review(self, request, r):
        body = await request.json()
        spec = body.get("spec") or {}
        policy = self.policy()
        out = {"apiVersion": r.api_version, "kind": r.kind, "metadata": {}, "spec": spec}
        if r.kind == "TokenReview":
            who = policy.get("tokens", {}).get(spec.get("token"))
            wanted = spec.get("audiences") or []
            theirs = (who or {}).get("audiences") or []
            audiences = [a for a in wanted if a in theirs] if wanted else theirs
            if who is None or (wanted and not audiences):
                out["status"] = {"authenticated": False, "error": "invalid bearer token"}
            else:
                out["status"] = {"authenticated": True, "audiences": audiences,
                                 "user": {k: who[k] for k in ("username", "uid", "groups") if k in who}}
            return web.json_response(out, status=201)
        attrs = spec.get("resourceAttributes")
        non_resource = spec.get("nonResourceAttributes")
        allowed = False
        for rule in policy.get("rules", []):
            if rule.get("user") != spec.get("user"):
                continue
            if attrs and all(rule.get(k, "") == (attrs.get(k) or "") for k in
                             ("verb", "group", "resource", "subresource", "namespace")) \
                    and (not rule.get("names") or attrs.get("name") in rule["names"]):
                allowed = True
            if non_resource and rule.get("nonResourceURL") == non_resource.get("path") \
                    and rule.get("verb") == non_resource.get("verb"):
                allowed = True
        out["status"] = {"allowed": allowed, "reason": "allowed by the test policy" if allowed else ""}
        return web.json_response(out, status=201)

    # ------------------------------------------------------------ scale
    @staticmethod
    def scale_of(obj):
        spec = obj.get("spec") or {}
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        replicas = spec.get("replicas", 1)
        meta = obj["metadata"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": meta["name"], "namespace": meta.get("namespace"),
                             "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
                "spec": {"replicas": replicas},
                "status": {"replicas": (obj.get("status") or {}).get("replicas", replicas),
                           "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))}}

    async def scale(self, request, r, ns, name, obj):
        if obj is None:
            return self.not_found(r, name)
        if request.method == "GET":
            return web.json_response(self.scale_of(obj))
        if request.method not in ("PUT", "PATCH"):
            return status_error(405, "MethodNotAllowed", request.method)
        body = json.loads(await request.text() or "null")
        current = self.scale_of(obj)
        ctype = request.headers.get("Content-Type", "").split(";")[0]
        if request.method == "PUT":
            new = body
        elif ctype == "application/json-patch+json":
            new = apply_json_patch(current, body)
        else:
            new = merge(current, body)
        replicas = (new.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            return status_error(422, "Invalid", f"spec.replicas: Invalid value: {replicas!r}")
        updated = copy.deepcopy(obj)
        updated.setdefault("spec", {})["replicas"] = replicas
        updated.setdefault("status", {})["replicas"] = replicas
        stored = self.store(r, ns, updated, old=obj)
        await self.notify()
        return web.json_response(self.scale_of(stored))

    async def watch(self, request, r, ns):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        since = request.query.get("resourceVersion", "")
        bookmarks = request.query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(request.query.get("timeoutSeconds", "290"))
        deadline = asyncio.get_running_loop().time() + timeout
        _, fields = self.selected(request, r, ns)

        def wanted(event):
            meta = event["object"]["metadata"]
            return ((ns is None or meta.get("namespace") == ns)
                    and fields.get("metadata.name", meta["name"]) == meta["name"])

        async def send(event):
            await response.write(json.dumps(event).encode() + b"\n")

        if since in ("", "0"):
            items, _ = self.selected(request, r, ns)
            for obj in items:
                await send({"type": "ADDED", "object": obj})
            last = self.rv
        else:
            last = int(since)
            if self.history and last < self.history[0][0] - 1:
                await send({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                        "reason": "Expired", "code": 410,
                                                        "message": f"too old resource version: {last}"}})
                return response
        try:
            while True:
                for rv, g, p, event in self.history:
                    if rv > last and (g, p) == (r.group, r.plural) and wanted(event):
                        await send(event)
                last = max(last, self.rv)
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return response
                async with self.changed:
                    try:
                        await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 5))
                    except TimeoutError:
                        if bookmarks:
                            await send({"type": "BOOKMARK", "object": {
                                "kind": r.kind, "apiVersion": r.api_version,
                                "metadata": {"resourceVersion": str(self.rv)}}})
        except (ConnectionResetError, asyncio.CancelledError):
            return response


def apply_json_patch(obj, ops):
    kept = []
    for op in ops:
        if op.get("op") == "test" and op.get("value") is None:
            try:
                jsonpatch.JsonPointer(op["path"]).resolve(obj)
            except jsonpatch.JsonPointerException:
                continue  # Kubernetes: a missing path tests equal to null
        kept.append(op)
    return jsonpatch.apply_patch(obj, kept)


def merge(target, patch):
    if not isinstance(patch, dict):
        return patch
    target = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge(target.get(k), v)
    return target


def age(timestamp):
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    secs = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crds", required=True, help="directory of CustomResourceDefinition YAML files")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--request-log", help="append one JSON line per request to this file")
    parser.add_argument("--auth-policy", help="JSON file answering TokenReviews and SubjectAccessReviews")
    args = parser.parse_args()
    emulator = Emulator(args.crds, args.request_log, args.auth_policy)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", emulator.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    if args.port_file:
        tmp = pathlib.Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.rename(args.port_file)
    print(f"kubernetes emulator listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
