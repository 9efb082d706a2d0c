// Validates the Prometheus Operator resources (ServiceMonitor, PodMonitor, PrometheusRule, ...)
// in rendered manifests against the operator's CRD schemas, which kubernetes-validate lacks.
//   node validate_crds.mjs RENDERED.yaml...
// Needs @kubernetes-models/prometheus-operator and js-yaml (deploy/check.sh installs them).
import { readFileSync } from "node:fs";
import yaml from "js-yaml";

const GROUP = "monitoring.coreos.com/";
let failures = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8")).filter(Boolean)) {
    if (!doc.apiVersion?.startsWith(GROUP)) continue;
    const name = `${doc.kind}/${doc.metadata?.name}`;
    const version = doc.apiVersion.slice(GROUP.length);
    let model;
    try {
      model = await import(`@kubernetes-models/prometheus-operator/${GROUP}${version}/${doc.kind}`);
    } catch {
      console.error(`error: ${file}: ${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
      failures++;
      continue;
    }
    try {
      new model[doc.kind](doc).validate();
      console.log(`ok: ${file}: ${name}`);
    } catch (e) {
      console.error(`error: ${file}: ${name}: ${e.message}`);
      failures++;
    }
  }
}
process.exit(failures ? 1 : 0);
