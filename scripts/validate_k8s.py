#!/usr/bin/env python3
"""Offline checks of cnnserve's Kubernetes manifests, run by scripts/validate-k8s.sh in its venv.

    validate_k8s.py check          render and check everything (what validate-k8s.sh runs)
    validate_k8s.py render DIR     print what the kustomization in DIR renders to (YAML)
    validate_k8s.py extract-crd --crd FILE --version V --source TEXT --out FILE.json
                                   keep a CRD version's schema in deploy/kserve/schema/

`check` does, without a cluster or a network:

1. Renders deploy/kubernetes/base and deploy/kubernetes/overlays/example with the subset of
   kustomize below (no kubectl needed), and checks that every file in those folders is used. Where
   `kubectl` is on the PATH, its `kubectl kustomize` must render the same objects (a check of this
   renderer: ConfigMap and Secret hash suffixes included).
2. Validates every rendered object against the Kubernetes OpenAPI schemas of each version in
   K8S_VERSIONS (kubernetes-validate's bundled schemas, strict: unknown fields are errors).
3. Checks what the API server and the controllers check beyond the schema, and this project's
   rules from issue #14 (see check_semantics and check_project_rules).
4. Validates deploy/kserve/inferenceservice.yaml: KServe's objects against the CRD schemas kept in
   deploy/kserve/schema (strict, with x-kubernetes-list-type), the others as in 2.
5. Self-check: broken copies of objects must each be rejected, else the check fails.

The kustomize subset: resources (files and folders), namespace, labels (includeSelectors false),
images, replicas, configMapGenerator and secretGenerator (literals, envs; behavior create, merge,
replace; hashed names and the references to them), generatorOptions (disableNameSuffixHash,
labels, annotations), patches (JSON 6902 operations, inline or in a file). Any other field is an
error, so a kustomization never uses something this check silently skips.
"""

import argparse
import base64
import copy
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
K8S_VERSIONS = ("1.30", "1.37")  # the oldest supported (preStop `sleep`), and the newest known
KUSTOMIZATIONS = ("deploy/kubernetes/base", "deploy/kubernetes/overlays/example")
KSERVE_EXAMPLE = "deploy/kserve/inferenceservice.yaml"
KSERVE_SCHEMAS = "deploy/kserve/schema"

# CNNSERVE_* variables the manifests may set before src/ names them (a flag being added in the
# same change); the check lists them, and says when src/ has one. Empty: src/ has them all.
PENDING_ENV = set()

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
                  "ClusterServingRuntime", "ClusterStorageContainer"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


class Failure(Exception):
    """A check that cannot go on (a kustomization this renderer cannot render, a missing file)."""


def rel(path):
    return os.path.relpath(path, ROOT)


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        try:
            return [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            raise Failure(f"{rel(path)}: not YAML: {e}")


def ident(obj):
    md = obj.get("metadata") or {}
    return (obj.get("kind"), md.get("namespace"), md.get("name"))


def show(obj):
    md = obj.get("metadata") or {}
    ns = f"{md['namespace']}/" if md.get("namespace") else ""
    return f"{obj.get('apiVersion')} {obj.get('kind')} {ns}{md.get('name')}"


# ---------------------------------------------------------------------------------------------
# The kustomize subset

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images",
                        "replicas", "configMapGenerator", "secretGenerator", "generatorOptions",
                        "patches"}
GENERATOR_FIELDS = {"name", "namespace", "behavior", "literals", "envs", "type", "options"}


class Res:
    """A rendered object; `generator`: the name of the generator that made it, if one did;
    `hashed`: its name gets the hash of its content at the end."""

    def __init__(self, obj, origin, generator=None, hashed=False):
        self.obj, self.origin, self.generator, self.hashed = obj, origin, generator, hashed


def env_file_pairs(path):
    """kustomize's `envs` format: KEY=VALUE lines, `#` comments, the value as written."""
    pairs = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f.read().splitlines(), 1):
            line = line.lstrip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                # kustomize would take the value from the environment of whoever renders it.
                raise Failure(f"{rel(path)}:{n}: `{line}` has no `=VALUE`")
            key, value = line.split("=", 1)
            if not re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", key):
                raise Failure(f"{rel(path)}:{n}: `{key}` is not a valid key")
            pairs.append((key, value))
    return pairs


def literal_pair(source, where):
    if "=" not in source:
        raise Failure(f"{where}: literal `{source}` has no `=`")
    key, value = source.split("=", 1)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return key, value


def kyaml_base64(raw):
    """Base64 as kustomize writes a Secret's values: in lines of 70, each ending in a newline when
    there is more than one line (the API server's decoder skips newlines)."""
    text = base64.b64encode(raw).decode()
    if len(text) < 70:
        return text
    return "".join(text[i:i + 70] + "\n" for i in range(0, len(text), 70))


def generate(kind, gen, base, options, where):
    unknown = set(gen) - GENERATOR_FIELDS
    if unknown:
        raise Failure(f"{where}: {kind} generator fields not supported here: {sorted(unknown)}")
    pairs = []
    for env in gen.get("envs", []):
        pairs += env_file_pairs(os.path.join(base, env))
    for lit in gen.get("literals", []):
        pairs.append(literal_pair(lit, where))
    data = {}
    for key, value in pairs:
        if key in data:
            raise Failure(f"{where}: {kind} {gen['name']}: key {key} given twice")
        data[key] = value
    opts = dict(options or {})
    opts.update(gen.get("options") or {})
    unknown = set(opts) - {"disableNameSuffixHash", "labels", "annotations"}
    if unknown:
        raise Failure(f"{where}: generator options not supported here: {sorted(unknown)}")
    md = {"name": gen["name"]}
    if gen.get("namespace"):
        md["namespace"] = gen["namespace"]
    if opts.get("labels"):
        md["labels"] = dict(opts["labels"])
    if opts.get("annotations"):
        md["annotations"] = dict(opts["annotations"])
    obj = {"apiVersion": "v1", "kind": kind, "metadata": md}
    if kind == "Secret":
        obj["type"] = gen.get("type", "Opaque")
        data = {k: kyaml_base64(v.encode()) for k, v in data.items()}
    obj["data"] = data
    return obj, not opts.get("disableNameSuffixHash", False)


def json_patch(doc, ops, where):
    """RFC 6902 add, remove, replace, test (what kustomize's JSON 6902 patches do)."""

    def parts(path):
        if not path.startswith("/"):
            raise Failure(f"{where}: patch path `{path}` does not start with /")
        return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]

    def walk(path):
        *head, last = parts(path)
        node = doc
        for p in head:
            try:
                node = node[int(p)] if isinstance(node, list) else node[p]
            except (KeyError, IndexError, ValueError):
                raise Failure(f"{where}: patch path `{path}` does not exist")
        return node, last

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        node, last = walk(path)
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
        if kind == "add":
            if isinstance(node, list):
                node.insert(index, copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind in ("replace", "remove", "test"):
            try:
                current = node[index] if isinstance(node, list) else node[last]
            except (KeyError, IndexError):
                raise Failure(f"{where}: patch path `{path}` does not exist")
            if kind == "replace":
                node[index if isinstance(node, list) else last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index if isinstance(node, list) else last]
            elif current != op["value"]:
                raise Failure(f"{where}: patch test at `{path}` failed")
        else:
            raise Failure(f"{where}: patch op `{kind}` not supported here")


def pod_spec(obj):
    """The pod spec of a workload (None for other kinds)."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    if kind in WORKLOADS:
        return (spec.get("template") or {}).get("spec")
    return None


def containers(podspec, init=True):
    out = list(podspec.get("containers") or [])
    if init:
        out = list(podspec.get("initContainers") or []) + out
    return out


def split_image(image):
    """`name[:tag][@digest]` -> (name, tag, digest); a registry port is part of the name."""
    name, _, digest = image.partition("@")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def build(directory, depth=0):
    """The objects the kustomization in `directory` renders to, generated names not yet hashed."""
    if depth > 10:
        raise Failure(f"{rel(directory)}: kustomizations nested too deep")
    path = os.path.join(directory, "kustomization.yaml")
    if not os.path.isfile(path):
        raise Failure(f"{rel(directory)}: no kustomization.yaml")
    docs = load_docs(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise Failure(f"{rel(path)}: one mapping expected")
    k = docs[0]
    where = rel(path)
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Failure(f"{where}: fields this renderer does not implement: {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise Failure(f"{where}: kind {k.get('kind')}, not Kustomization")

    out = []
    for r in k.get("resources") or []:
        p = os.path.normpath(os.path.join(directory, r))
        if os.path.isdir(p):
            out += build(p, depth + 1)
        elif os.path.isfile(p):
            out += [Res(d, rel(p)) for d in load_docs(p)]
        else:
            raise Failure(f"{where}: resource {r} not found (remote resources are not supported)")

    for field, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for gen in k.get(field) or []:
            obj, hashed = generate(kind, gen, directory, k.get("generatorOptions"), where)
            behavior = gen.get("behavior", "create")
            same = [r for r in out if r.generator == gen["name"] and r.obj["kind"] == kind
                    and r.obj["metadata"].get("namespace") == obj["metadata"].get("namespace")]
            if behavior == "create":
                if same or any(ident(r.obj) == ident(obj) for r in out):
                    raise Failure(f"{where}: {kind} {gen['name']} exists already: use behavior merge or replace")
                out.append(Res(obj, where, generator=gen["name"], hashed=hashed))
            elif behavior in ("merge", "replace"):
                if len(same) != 1:
                    raise Failure(f"{where}: {behavior}: no generated {kind} {gen['name']} to {behavior}")
                target = same[0].obj
                if behavior == "merge":
                    target["data"].update(obj["data"])
                    for m in ("labels", "annotations"):
                        if obj["metadata"].get(m):
                            target["metadata"].setdefault(m, {}).update(obj["metadata"][m])
                else:
                    target["data"] = obj["data"]
                same[0].hashed = same[0].hashed and hashed
            else:
                raise Failure(f"{where}: behavior {behavior} unknown")

    for patch in k.get("patches") or []:
        unknown = set(patch) - {"target", "patch", "path"}
        if unknown:
            raise Failure(f"{where}: patch fields not supported here: {sorted(unknown)}")
        text = patch.get("patch")
        if patch.get("path"):
            with open(os.path.join(directory, patch["path"]), encoding="utf-8") as f:
                text = f.read()
        ops = yaml.safe_load(text or "")
        if not isinstance(ops, list):
            raise Failure(f"{where}: only JSON 6902 patches (a list of operations) are supported here")
        target = patch.get("target") or {}
        unknown = set(target) - {"kind", "name", "namespace", "group", "version"}
        if unknown:
            raise Failure(f"{where}: patch target fields not supported here: {sorted(unknown)}")
        hits = 0
        for r in out:
            api = r.obj.get("apiVersion", "")
            group, _, version = api.rpartition("/")
            md = r.obj.get("metadata") or {}
            if all(target.get(f) in (None, value) for f, value in (
                    ("kind", r.obj.get("kind")), ("name", md.get("name")), ("namespace", md.get("namespace")),
                    ("group", group), ("version", version))):
                json_patch(r.obj, ops, f"{where}: patch on {show(r.obj)}")
                hits += 1
        if not hits:
            raise Failure(f"{where}: patch target {target} matches nothing")

    if k.get("namespace"):
        for r in out:
            if r.obj.get("kind") not in CLUSTER_SCOPED:
                r.obj.setdefault("metadata", {})["namespace"] = k["namespace"]

    for label in k.get("labels") or []:
        unknown = set(label) - {"pairs", "includeSelectors", "includeTemplates"}
        if unknown or label.get("includeSelectors") or label.get("includeTemplates"):
            raise Failure(f"{where}: only labels with includeSelectors and includeTemplates false are supported here")
        for r in out:
            r.obj.setdefault("metadata", {}).setdefault("labels", {}).update(label.get("pairs") or {})

    for rep in k.get("replicas") or []:
        hits = [r for r in out if r.obj.get("kind") in ("Deployment", "StatefulSet", "ReplicaSet")
                and r.obj["metadata"].get("name") == rep["name"]]
        if not hits:
            raise Failure(f"{where}: replicas: no workload named {rep['name']}")
        for r in hits:
            r.obj["spec"]["replicas"] = rep["count"]

    for image in k.get("images") or []:
        unknown = set(image) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise Failure(f"{where}: image fields not supported here: {sorted(unknown)}")
        hits = 0
        for r in out:
            spec = pod_spec(r.obj)
            for c in containers(spec) if spec else []:
                name, tag, digest = split_image(c.get("image", ""))
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if image.get("digest"):
                    c["image"] = f"{name}@{image['digest']}"
                else:
                    tag = image.get("newTag", tag)
                    c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                hits += 1
        if not hits:
            raise Failure(f"{where}: images: no container runs {image['name']}")
    return out


def go_json(value):
    """Go's json.Marshal of maps of strings: sorted keys, no spaces, <, >, & escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def kustomize_hash(obj):
    """kustomize's name suffix (api/hasher): sha256 of the JSON of kind, name, (type) and data,
    its first 10 hex digits with 0, 1, 3, a, e replaced. kustomize looks the name up at the path
    `metadata/name` taken as one key, finds nothing and hashes "" instead: so does this."""
    data = obj.get("data") if obj.get("data") else ""
    if obj["kind"] == "ConfigMap":
        enc = {"kind": "ConfigMap", "name": "", "data": data}
    else:
        enc = {"kind": "Secret", "type": obj.get("type", "Opaque"), "name": "", "data": data}
    digest = hashlib.sha256(go_json(enc).encode()).hexdigest()
    return digest[:10].translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def rename_refs(obj, renames):
    """References to generated ConfigMaps and Secrets in a pod spec follow their new names."""
    spec = pod_spec(obj)
    if not spec:
        return
    ns = (obj.get("metadata") or {}).get("namespace")

    def fix(ref, kind, field="name"):
        if ref and (kind, ns, ref.get(field)) in renames:
            ref[field] = renames[(kind, ns, ref[field])]

    for c in containers(spec) + list(spec.get("ephemeralContainers") or []):
        for e in c.get("envFrom") or []:
            fix(e.get("configMapRef"), "ConfigMap")
            fix(e.get("secretRef"), "Secret")
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            fix(vf.get("configMapKeyRef"), "ConfigMap")
            fix(vf.get("secretKeyRef"), "Secret")
    for v in spec.get("volumes") or []:
        fix(v.get("configMap"), "ConfigMap")
        fix(v.get("secret"), "Secret", "secretName")
        for s in (v.get("projected") or {}).get("sources") or []:
            fix(s.get("configMap"), "ConfigMap")
            fix(s.get("secret"), "Secret")
    for s in spec.get("imagePullSecrets") or []:
        fix(s, "Secret")


def render(directory):
    """The objects `kubectl kustomize directory` gives, with this subset of kustomize."""
    out = build(os.path.join(ROOT, directory))
    renames = {}
    for r in out:
        if r.hashed:
            old = ident(r.obj)
            r.obj["metadata"]["name"] = f"{r.obj['metadata']['name']}-{kustomize_hash(r.obj)}"
            renames[old] = r.obj["metadata"]["name"]
    for r in out:
        rename_refs(r.obj, renames)
    return out


def listed_files(directory):
    """Every file the kustomization in `directory` (not its bases) uses."""
    k = load_docs(os.path.join(directory, "kustomization.yaml"))[0]
    used = {"kustomization.yaml"}
    used |= {r for r in k.get("resources") or [] if os.path.isfile(os.path.join(directory, r))}
    for field in ("configMapGenerator", "secretGenerator"):
        for gen in k.get(field) or []:
            used |= set(gen.get("envs") or [])
    used |= {p["path"] for p in k.get("patches") or [] if p.get("path")}
    return {os.path.normpath(u) for u in used}


def check_listed(directory, used):
    """Files in the folder that the kustomization does not use (a manifest added, not listed)."""
    present = {f for f in os.listdir(directory) if os.path.isfile(os.path.join(directory, f))
               and re.search(r"\.(ya?ml|env|json)$", f)}
    return [f"{rel(os.path.join(directory, f))}: in the folder but not in its kustomization.yaml"
            for f in sorted(present - used)]


def kubectl_kustomize(directory):
    """`kubectl kustomize`'s objects, or None without kubectl."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None, "no kubectl on the PATH"
    try:
        run = subprocess.run([kubectl, "kustomize", os.path.join(ROOT, directory)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"kubectl kustomize did not run: {e}"
    if run.returncode != 0:
        return None, f"kubectl kustomize failed: {run.stderr.strip()}"
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True)
    found = re.search(r"Kustomize Version: (\S+)", version.stdout)
    return [d for d in yaml.safe_load_all(run.stdout) if d], found.group(1) if found else "?"


# ---------------------------------------------------------------------------------------------
# Kubernetes schemas (kubernetes-validate) and the checks beyond them

def validate_core(obj):
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"Kubernetes {version} schema: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(e.message)
        except kubernetes_validate.utils.VersionNotSupportedError as e:
            errors.append(e.message)
    return errors


def quantity(q):
    """A Kubernetes quantity as a float (`500m`, `2Gi`, `1.5`, `1e3`)."""
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?", str(q))
    if not m:
        raise ValueError(f"`{q}` is not a quantity")
    factor = {None: 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "P": 1e15, "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
              "Pi": 2**50, "Ei": 2**60}[m.group(2)]
    return float(m.group(1)) * factor


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def template_labels(obj):
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return (obj.get("metadata") or {}).get("labels") or {}
    return ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}


def check_semantics(objects):
    """What the API server and controllers reject or get wrong that the schemas do not catch."""
    errors = []
    seen = {}
    by_kind = {}
    for o in objects:
        if ident(o) in seen:
            errors.append((o, "defined twice"))
        seen[ident(o)] = o
        by_kind.setdefault(o.get("kind"), []).append(o)

    for o in objects:
        md = o.get("metadata") or {}
        name = md.get("name") or ""
        pattern, limit = (DNS_LABEL, 63) if o.get("kind") in ("Service", "Namespace") else (DNS_SUBDOMAIN, 253)
        if not pattern.fullmatch(name) or len(name) > limit:
            errors.append((o, f"metadata.name `{name}` is not a valid name for a {o.get('kind')}"))
        for where, labels in (("metadata.labels", md.get("labels")),
                              ("spec.template.metadata.labels", template_labels(o))):
            for k, v in (labels or {}).items():
                if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.fullmatch(v):
                    errors.append((o, f"{where}: `{k}: {v}` is not a valid label value"))

    def lookup(kind, ns, name):
        return seen.get((kind, ns, name))

    workloads = [o for o in objects if pod_spec(o) is not None]
    for o in workloads:
        ns = (o.get("metadata") or {}).get("namespace")
        spec, tlabels = pod_spec(o), template_labels(o)
        sel = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels")
        if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet") and not selects(sel, tlabels):
            errors.append((o, f"spec.selector {sel} does not select the template's labels {tlabels}"))
        if o.get("kind") in ("Deployment", "StatefulSet") and (o.get("spec") or {}).get("replicas") is not None:
            for hpa in by_kind.get("HorizontalPodAutoscaler", []):
                ref = hpa["spec"].get("scaleTargetRef") or {}
                if ref.get("kind") == o["kind"] and ref.get("name") == o["metadata"]["name"]:
                    errors.append((o, "spec.replicas set on a workload an HPA scales: every apply resets it"))
        volumes = {v.get("name") for v in spec.get("volumes") or []}
        names = [c.get("name") for c in containers(spec)]
        for dup in {n for n in names if names.count(n) > 1}:
            errors.append((o, f"container name {dup} used twice"))

        def ref_exists(kind, ref, key, where, c):
            if not ref or ref.get("optional"):
                return
            target = lookup(kind, ns, ref.get("name"))
            if target is None:
                errors.append((o, f"{c}: {where}: no {kind} named {ref.get('name')}"))
            elif key is not None and key not in (target.get("data") or {}) and key not in (target.get("stringData") or {}):
                errors.append((o, f"{c}: {where}: {kind} {ref.get('name')} has no key {key}"))

        for c in containers(spec):
            cname = f"container {c.get('name')}"
            if not DNS_LABEL.fullmatch(c.get("name") or ""):
                errors.append((o, f"{cname}: not a valid container name"))
            ports = c.get("ports") or []
            pnames = [p.get("name") for p in ports if p.get("name")]
            for dup in {n for n in pnames if pnames.count(n) > 1}:
                errors.append((o, f"{cname}: port name {dup} used twice"))
            for p in pnames:
                if len(p) > 15 or not PORT_NAME.fullmatch(p) or not re.search("[a-z]", p):
                    errors.append((o, f"{cname}: `{p}` is not a valid port name"))
            envs = [e.get("name") for e in c.get("env") or []]
            for dup in {n for n in envs if envs.count(n) > 1}:
                errors.append((o, f"{cname}: env {dup} set twice"))
            for e in c.get("envFrom") or []:
                ref_exists("ConfigMap", e.get("configMapRef"), None, "envFrom", cname)
                ref_exists("Secret", e.get("secretRef"), None, "envFrom", cname)
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if vf.get(field):
                        ref_exists(kind, vf[field], vf[field].get("key"), f"env {e.get('name')}", cname)
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    errors.append((o, f"{cname}: volumeMount {m.get('name')}: no such volume"))
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                action = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket")
                if action and isinstance(action.get("port"), str) and action["port"] not in pnames:
                    errors.append((o, f"{cname}: {probe} port `{action['port']}` is not one of its ports {pnames}"))
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            for rname in set(requests) | set(limits):
                try:
                    req = quantity(requests[rname]) if rname in requests else None
                    lim = quantity(limits[rname]) if rname in limits else None
                except ValueError as e:
                    errors.append((o, f"{cname}: resources {rname}: {e}"))
                    continue
                extended = "/" in rname and not rname.startswith(("kubernetes.io/", "requests."))
                if extended and (lim is None or (req is not None and req != lim)):
                    errors.append((o, f"{cname}: {rname} is an extended resource: give a limit, equal to the request"))
                if extended and any(x is not None and x != int(x) for x in (req, lim)):
                    errors.append((o, f"{cname}: {rname} must be a whole number"))
                if req is not None and lim is not None and req > lim:
                    errors.append((o, f"{cname}: resources {rname}: request {requests[rname]} over the limit {limits[rname]}"))
        for v in spec.get("volumes") or []:
            if v.get("configMap"):
                ref_exists("ConfigMap", v["configMap"], None, f"volume {v['name']}", "pod")
                for item in v["configMap"].get("items") or []:
                    ref_exists("ConfigMap", v["configMap"], item.get("key"), f"volume {v['name']}", "pod")
            if v.get("secret"):
                ref = {"name": v["secret"].get("secretName"), "optional": v["secret"].get("optional")}
                ref_exists("Secret", ref, None, f"volume {v['name']}", "pod")
                for item in v["secret"].get("items") or []:
                    ref_exists("Secret", ref, item.get("key"), f"volume {v['name']}", "pod")

    for svc in by_kind.get("Service", []):
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName":
            if not DNS_SUBDOMAIN.fullmatch(spec.get("externalName") or ""):
                errors.append((svc, "an ExternalName Service needs a host name in spec.externalName"))
            if spec.get("selector"):
                errors.append((svc, "an ExternalName Service selects no pods: drop spec.selector"))
            continue
        sel = spec.get("selector") or {}
        ns = svc["metadata"].get("namespace")
        pods = [w for w in workloads if w["metadata"].get("namespace") == ns and selects(sel, template_labels(w))]
        if sel and not pods:
            errors.append((svc, f"spec.selector {sel} selects no pods of these manifests"))
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for w in pods:
                cports = [p for c in containers(pod_spec(w), init=False) for p in c.get("ports") or []]
                if isinstance(target, str):
                    ok = any(p.get("name") == target for p in cports)
                else:
                    ok = any(p.get("containerPort") == target for p in cports)
                if not ok:
                    errors.append((svc, f"port {port.get('name')}: targetPort {target} is no port of {show(w)}"))

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        spec = hpa.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        target = lookup(ref.get("kind"), hpa["metadata"].get("namespace"), ref.get("name"))
        if target is None:
            errors.append((hpa, f"scaleTargetRef {ref.get('kind')} {ref.get('name')} is not in these manifests"))
        elif ref.get("apiVersion") != target.get("apiVersion"):
            errors.append((hpa, f"scaleTargetRef apiVersion {ref.get('apiVersion')}, the target's is {target.get('apiVersion')}"))
        low, high = spec.get("minReplicas", 1), spec.get("maxReplicas", 0)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append((hpa, "minReplicas over maxReplicas"))
        for metric in spec.get("metrics") or []:
            res = metric.get("resource") or {}
            if metric.get("type") == "Resource" and (res.get("target") or {}).get("type") == "Utilization" and target:
                for c in containers(pod_spec(target), init=False):
                    if res.get("name") not in ((c.get("resources") or {}).get("requests") or {}):
                        errors.append((hpa, f"{res.get('name')} utilization, but container {c.get('name')} of {ref.get('name')} requests no {res.get('name')}"))

    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = ((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels")
        if not any(selects(sel, template_labels(w)) for w in workloads):
            errors.append((pdb, f"spec.selector {sel} selects no pods of these manifests"))
    return errors


def container_env(obj, objects, cname="cnnserve"):
    """The environment a container gets from its env and envFrom ConfigMaps: {name: value}."""
    ns = obj["metadata"].get("namespace")
    for c in containers(pod_spec(obj)):
        if c.get("name") != cname:
            continue
        env = {}
        for e in c.get("envFrom") or []:
            ref = e.get("configMapRef")
            cm = next((o for o in objects if ident(o) == ("ConfigMap", ns, (ref or {}).get("name"))), None)
            if cm:
                env.update({e.get("prefix", "") + k: v for k, v in (cm.get("data") or {}).items()})
        for e in c.get("env") or []:
            env[e["name"]] = e.get("value", "(from a reference)")
        return env, c
    return {}, None


def known_env_names():
    """Every "CNNSERVE_*" string in src/ (clap's `env = "..."` attributes and the like)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True):
        with open(path, encoding="utf-8") as f:
            names |= set(re.findall(r'"(CNNSERVE_[A-Z0-9_]+)"', f.read()))
    return names


def check_project_rules(objects, known_env):
    """Issue #14's requirements, so that the manifests keep them."""
    errors, notes = [], []

    def find(kind, name):
        return next((o for o in objects if o.get("kind") == kind and o["metadata"].get("name") == name), None)

    api, worker = find("Deployment", "cnnserve-api"), find("Deployment", "cnnserve-worker")
    for name, dep, role in (("cnnserve-api", api, "api"), ("cnnserve-worker", worker, "worker")):
        if dep is None:
            errors.append((None, f"no Deployment {name}"))
            continue
        env, c = container_env(dep, objects)
        if c is None:
            errors.append((dep, "no container named cnnserve"))
            continue
        if env.get("CNNSERVE_ROLE") != role:
            errors.append((dep, f"CNNSERVE_ROLE is {env.get('CNNSERVE_ROLE')}, not {role}"))
        for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/ping")):
            got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
            if got != path:
                errors.append((dep, f"{probe} on {got}, not {path}"))
        for key in ("CNNSERVE_DATABASE_URL", "CNNSERVE_MODEL_STORE", "CNNSERVE_ADDR"):
            if key not in env:
                errors.append((dep, f"{key} not set"))
        inits = [i for i in pod_spec(dep).get("initContainers") or [] if (i.get("args") or [])[:1] == ["fetch-weights"]]
        if not inits:
            errors.append((dep, "no fetch-weights initContainer: the replicas' weights could differ"))
    if worker is not None:
        env, c = container_env(worker, objects)
        gpus = ((c or {}).get("resources") or {}).get("requests", {}).get("nvidia.com/gpu")
        if not gpus:
            errors.append((worker, "requests no nvidia.com/gpu"))
        if env.get("CNNSERVE_DEVICE") != "cuda":
            errors.append((worker, f"CNNSERVE_DEVICE is {env.get('CNNSERVE_DEVICE')}, not cuda"))
    if api is not None:
        env, _ = container_env(api, objects)
        if not (env.get("CNNSERVE_API_KEY_FILE") or env.get("CNNSERVE_API_KEY")):
            errors.append((api, "no API key (CNNSERVE_API_KEY_FILE or CNNSERVE_API_KEY)"))
    hpas = [o for o in objects if o.get("kind") == "HorizontalPodAutoscaler"
            and (o["spec"].get("scaleTargetRef") or {}).get("name") == "cnnserve-api"]
    if not hpas or hpas[0].get("apiVersion") != "autoscaling/v2":
        errors.append((None, "no autoscaling/v2 HorizontalPodAutoscaler for cnnserve-api"))
    if not any(o.get("kind") == "Service" and selects(o["spec"].get("selector"), {"app.kubernetes.io/name": "cnnserve", "app.kubernetes.io/component": "api"}) for o in objects):
        errors.append((None, "no Service for the api pods"))
    for name in ("cnnserve-postgres", "cnnserve-s3"):
        svc = find("Service", name)
        if svc is None or svc["spec"].get("type") != "ExternalName":
            errors.append((None, f"no ExternalName Service {name}"))

    # Every CNNSERVE_* variable must be one cnnserve reads.
    for dep in (api, worker):
        if dep is None:
            continue
        for c in containers(pod_spec(dep)):
            env, _ = container_env(dep, objects, c["name"])
            for name in sorted(env):
                if not name.startswith("CNNSERVE_") or name in known_env:
                    continue
                if name in PENDING_ENV:
                    notes.append(name)
                else:
                    errors.append((dep, f"container {c['name']}: {name} is no variable cnnserve reads (no \"{name}\" in src/)"))
    for name in sorted(PENDING_ENV & known_env):
        notes.append(f"{name} is in src/ now: drop it from PENDING_ENV in scripts/validate_k8s.py")
    return errors, sorted(set(notes))


# ---------------------------------------------------------------------------------------------
# KServe: its CRDs' schemas, kept in deploy/kserve/schema

def schema_children(schema):
    """The sub-schemas of a CRD schema node (not the names of its properties)."""
    for key in ("properties", "patternProperties"):
        yield from (schema.get(key) or {}).values()
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            yield schema[key]
    for key in ("anyOf", "allOf", "oneOf"):
        yield from schema.get(key) or []


def strictify(schema):
    """Unknown fields are errors (what `kubectl apply` gets with the API server's strict field
    validation), except under x-kubernetes-preserve-unknown-fields."""
    if (schema.get("properties") is not None and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for child in schema_children(schema):
        strictify(child)
    return schema


def list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: `set` items and `map` keys are unique (the API server checks it)."""
    if not validator.is_type(instance, "array"):
        return
    if value == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        for dup in sorted({s for s in seen if seen.count(s) > 1}):
            yield jsonschema.ValidationError(f"x-kubernetes-list-type set: {dup} is there twice")
    elif value == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        item_schema = schema.get("items") or {}
        defaults = {k: ((item_schema.get("properties") or {}).get(k) or {}).get("default") for k in keys}
        seen = {}
        for item in (i for i in instance if isinstance(i, dict)):
            values = {k: item.get(k, defaults[k]) for k in keys}
            key = json.dumps(values, sort_keys=True)
            if key in seen:
                yield jsonschema.ValidationError(f"x-kubernetes-list-type map: two items with {values}")
            seen[key] = item


CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": list_type})


def load_crd_schemas():
    schemas = {}
    for path in sorted(glob.glob(os.path.join(ROOT, KSERVE_SCHEMAS, "*.json"))):
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
        for gvk in schema.get("x-kubernetes-group-version-kind") or []:
            schemas[(f"{gvk['group']}/{gvk['version']}", gvk["kind"])] = (path, schema)
    return schemas


def validate_crd_object(obj, schema):
    errors = []
    strict = strictify(copy.deepcopy(schema))
    # metadata is the API server's ObjectMeta (the CRD says only `type: object`).
    strict["properties"]["metadata"] = {"type": "object"}
    validator = CRDValidator(strict)
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "(top)"
        errors.append(f"CRD schema: {path}: {e.message}")
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata") or {}}
    errors += [e.replace("Kubernetes", "metadata, Kubernetes") for e in validate_core(meta)]
    return errors


def validate_any(obj, crds):
    """Errors of one object: a KServe one against its CRD schema, others against Kubernetes'."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in crds:
        path, schema = crds[key]
        return validate_crd_object(obj, schema), f"CRD schema {rel(path)}"
    if (obj.get("apiVersion") or "").startswith("serving.kserve.io/"):
        return [f"no schema for {key[0]} {key[1]} in {KSERVE_SCHEMAS}"], "-"
    return validate_core(obj), "Kubernetes " + ", ".join(K8S_VERSIONS)


# ---------------------------------------------------------------------------------------------
# The check

def check_rendered(objects, known_env):
    """Errors of a rendered kustomization: [(object or None, message)], and notes."""
    errors = []
    for o in objects:
        errors += [(o, m) for m in validate_core(o)]
    errors += check_semantics(objects)
    rule_errors, notes = check_project_rules(objects, known_env)
    return errors + rule_errors, notes


def self_check(rendered, kserve_docs, crds, known_env):
    """Broken copies that must each be rejected; returns the ones that were not."""
    base = [r.obj for r in rendered]

    def find(objs, kind, name):
        return next(o for o in objs if o.get("kind") == kind and o["metadata"].get("name") == name)

    def broken_base(change):
        objs = copy.deepcopy(base)
        change(objs)
        return check_rendered(objs, known_env)[0]

    def broken_kserve(kind, change):
        obj = copy.deepcopy(next(d for d in kserve_docs if d.get("kind") == kind))
        change(obj)
        return validate_any(obj, crds)[0]

    def api_container(objs):
        return find(objs, "Deployment", "cnnserve-api")["spec"]["template"]["spec"]["containers"][0]

    def typo_probe(objs):
        c = api_container(objs)
        c["readinesProbe"] = c.pop("readinessProbe")

    def sr_port_twice(obj):
        ports = obj["spec"]["containers"][0]["ports"]
        ports.append(copy.deepcopy(ports[0]))

    cases = [
        ("Deployment with a misspelt field (readinesProbe)", lambda: broken_base(typo_probe)),
        ("HPA with minReplicas \"two\"",
         lambda: broken_base(lambda objs: find(objs, "HorizontalPodAutoscaler", "cnnserve-api")["spec"].update(minReplicas="two"))),
        ("Service whose targetPort names no container port",
         lambda: broken_base(lambda objs: find(objs, "Service", "cnnserve")["spec"]["ports"][0].update(targetPort="htp"))),
        ("env from a Secret key that does not exist",
         lambda: broken_base(lambda objs: next(e for e in api_container(objs)["env"] if e["name"] == "CNNSERVE_DATABASE_URL")
                             ["valueFrom"]["secretKeyRef"].update(key="no-such-key"))),
        ("liveness probe on /health instead of /ping",
         lambda: broken_base(lambda objs: api_container(objs)["livenessProbe"]["httpGet"].update(path="/health"))),
        ("a CNNSERVE_* variable cnnserve does not read",
         lambda: broken_base(lambda objs: api_container(objs)["env"].append({"name": "CNNSERVE_NO_SUCH_FLAG", "value": "1"}))),
        ("worker without nvidia.com/gpu",
         lambda: broken_base(lambda objs: [c["resources"][k].pop("nvidia.com/gpu") for o in objs
                                           if o["metadata"]["name"] == "cnnserve-worker" and o["kind"] == "Deployment"
                                           for c in o["spec"]["template"]["spec"]["containers"] for k in ("requests", "limits")])),
        ("InferenceService with a misspelt field (protocolVersoin)",
         lambda: broken_kserve("InferenceService", lambda o: o["spec"]["predictor"]["model"].update(protocolVersoin="v2"))),
        ("InferenceService with minReplicas \"one\"",
         lambda: broken_kserve("InferenceService", lambda o: o["spec"]["predictor"].update(minReplicas="one"))),
        ("ServingRuntime with a container port listed twice (x-kubernetes-list-type map)",
         lambda: broken_kserve("ServingRuntime", sr_port_twice)),
        ("ServingRuntime with an invalid metadata.labels",
         lambda: broken_kserve("ServingRuntime", lambda o: o["metadata"].update(labels=["not", "a", "map"]))),
    ]

    def unlisted():
        directory = os.path.join(ROOT, KUSTOMIZATIONS[0])
        used = listed_files(directory)
        return check_listed(directory, used - {"api-hpa.yaml"})

    def unsupported():
        try:
            generate("ConfigMap", {"name": "x", "files": ["a"]}, ROOT, None, "test")
        except Failure as e:
            return [str(e)]
        return []

    cases += [("a manifest in the folder but not in kustomization.yaml", unlisted),
              ("a generator field this renderer does not implement", unsupported)]
    accepted = []
    for what, run in cases:
        try:
            errors = run()
        except Failure as e:
            errors = [str(e)]
        except Exception as e:  # the case no longer fits the manifests: fix the case
            print(f"  BROKEN    {what}: the case cannot run on these manifests ({type(e).__name__}: {e})")
            accepted.append(what)
            continue
        first = errors[0] if errors else None
        if isinstance(first, tuple):
            first = f"{show(first[0]) if first[0] else ''}: {first[1]}"
        print(f"  {'rejected' if errors else 'ACCEPTED'}  {what}" + (f"  ({first})" if first else ""))
        if not errors:
            accepted.append(what)
    return len(cases), accepted


def cmd_check(_args):
    known_env = known_env_names()
    crds = load_crd_schemas()
    passed, failed, notes = 0, 0, set()
    rendered_base = None
    for directory in KUSTOMIZATIONS:
        print(f"== {directory} (kustomize, rendered here)")
        try:
            rendered = render(directory)
        except Failure as e:
            print(f"  ERROR  {e}")
            failed += 1
            continue
        rendered_base = rendered_base or rendered
        objects = [r.obj for r in rendered]
        problems = [(None, m) for m in check_listed(os.path.join(ROOT, directory), listed_files(os.path.join(ROOT, directory)))]
        theirs, version = kubectl_kustomize(directory)
        if theirs is None:
            print(f"  (not compared with kubectl kustomize: {version})")
        else:
            mine = {ident(o): o for o in objects}
            other = {ident(o): o for o in theirs}
            if mine == other:
                print(f"  same {len(mine)} objects as kubectl kustomize (kustomize {version})")
            else:
                for key in sorted(set(mine) | set(other), key=str):
                    if mine.get(key) != other.get(key):
                        problems.append((None, f"{key}: this renderer and kubectl kustomize differ:\n"
                                               f"    here:    {json.dumps(mine.get(key), sort_keys=True)}\n"
                                               f"    kubectl: {json.dumps(other.get(key), sort_keys=True)}"))
        errors, found_notes = check_rendered(objects, known_env)
        notes |= set(found_notes)
        problems += errors
        for o in objects:
            mine_errors = [m for (e, m) in problems if e is o]
            status = "ok    " if not mine_errors else "ERROR "
            print(f"  {status}{show(o)}  [Kubernetes {', '.join(K8S_VERSIONS)}]")
            for m in mine_errors:
                print(f"          {m}")
            passed, failed = passed + (not mine_errors), failed + bool(mine_errors)
        for e, m in problems:
            if e is None or all(e is not o for o in objects):
                print(f"  ERROR  {show(e) + ': ' if e else ''}{m}")
                failed += 1

    print(f"== {KSERVE_EXAMPLE}")
    kserve_docs = load_docs(os.path.join(ROOT, KSERVE_EXAMPLE))
    for obj in kserve_docs:
        errors, against = validate_any(obj, crds)
        print(f"  {'ok    ' if not errors else 'ERROR '}{show(obj)}  [{against}]")
        for m in errors:
            print(f"          {m}")
        passed, failed = passed + (not errors), failed + bool(errors)
    for kind in ("InferenceService", "ServingRuntime"):
        if not any(d.get("kind") == kind for d in kserve_docs):
            print(f"  ERROR  no {kind} in {KSERVE_EXAMPLE}")
            failed += 1

    if notes:
        print("== notes")
        for n in sorted(notes):
            if n.startswith("CNNSERVE_") and " " not in n:
                print(f"  {n}: set by the manifests, not in src/ yet (issue #14's flags; PENDING_ENV)")
            else:
                print(f"  {n}")

    print("== self-check: broken copies must be rejected")
    if rendered_base is None:
        print("  ERROR  nothing rendered to break")
        failed += 1
    else:
        total, accepted = self_check(rendered_base, kserve_docs, crds, known_env)
        if accepted:
            print(f"  ERROR  {len(accepted)} of {total} broken copies were accepted: the checks above miss something")
            failed += 1
        else:
            print(f"  all {total} rejected")
    print(f"validate-k8s: {passed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_render(args):
    out = render(os.path.relpath(os.path.abspath(args.dir), ROOT))
    print(yaml.safe_dump_all([r.obj for r in out], sort_keys=False), end="")
    return 0


def strip_descriptions(schema):
    schema.pop("description", None)
    for child in schema_children(schema):
        strip_descriptions(child)
    return schema


def cmd_extract(args):
    docs = load_docs(args.crd)
    crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v["name"] == args.version)
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    # status is written by the controller, not by whoever applies the object.
    schema["properties"].pop("status", None)
    strip_descriptions(schema)
    out = {"$comment": f"{spec['names']['kind']} {spec['group']}/{args.version}: the openAPIV3Schema of "
                       f"{args.source}, without `status` and `description`s "
                       f"(scripts/validate_k8s.py extract-crd).",
           "x-kubernetes-group-version-kind": [{"group": spec["group"], "version": args.version,
                                                "kind": spec["names"]["kind"]}]}
    out.update(schema)
    with open(args.out, "w", encoding="utf-8") as f:
        # Compact (one line): indented, the InferenceService's schema is over 1.5 MB.
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    r = sub.add_parser("render")
    r.add_argument("dir")
    e = sub.add_parser("extract-crd")
    e.add_argument("--crd", required=True)
    e.add_argument("--version", required=True)
    e.add_argument("--source", required=True)
    e.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        return {"check": cmd_check, "render": cmd_render, "extract-crd": cmd_extract}[args.command](args)
    except Failure as e:
        print(f"validate-k8s: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
