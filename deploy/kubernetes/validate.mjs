// Validate the manifests of this folder against the Kubernetes API schema that the npm package
// kubernetes-models ships (types, required fields, enums, formats; not unknown fields):
//   npm install --prefix /tmp/k8sval kubernetes-models@5.1.0 js-yaml
//   cp deploy/kubernetes/validate.mjs /tmp/k8sval/ && node /tmp/k8sval/validate.mjs deploy/kubernetes/*.yaml
import fs from "node:fs";
import * as yaml from "js-yaml";
const kinds = {
  "batch/v1/Job": "kubernetes-models/batch/v1/Job",
  "v1/ConfigMap": "kubernetes-models/v1/ConfigMap",
  "v1/PersistentVolumeClaim": "kubernetes-models/v1/PersistentVolumeClaim",
  "v1/Pod": "kubernetes-models/v1/Pod",
};
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8")).filter(Boolean)) {
    const key = `${doc.apiVersion}/${doc.kind}`;
    const mod = kinds[key];
    if (!mod) { console.log(`${file}: ${key}: no schema here`); failed++; continue; }
    const cls = Object.values(await import(mod)).find(v => typeof v === "function" && v.apiVersion === doc.apiVersion && v.kind === doc.kind);
    try { new cls(doc).validate(); console.log(`${file}: ${key} ${doc.metadata.name}: valid`); }
    catch (e) { console.log(`${file}: ${key} ${doc.metadata?.name}: INVALID ${e.message}`); failed++; }
  }
}
process.exit(failed ? 1 : 0);
