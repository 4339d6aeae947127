// Validates custom resources against their CustomResourceDefinition's
// schema, for scripts/deploy_check.py: the Prometheus operator's kinds, with
// the validators that @kubernetes-models/prometheus-operator generates from
// the operator's CRDs.
//
// Usage: node crd_validate.mjs NODE_MODULES OBJECTS.json
// Prints one line per invalid object and exits 1 if there is any; exits 2 on
// an object of a kind it does not know.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file] = process.argv.slice(2);
if (!modules || !file) {
  console.error("usage: node crd_validate.mjs NODE_MODULES OBJECTS.json");
  process.exit(2);
}
const operator = await import(
  pathToFileURL(
    join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js"),
  ).href
);

let invalid = 0;
for (const object of JSON.parse(readFileSync(file, "utf8"))) {
  const name = `${object.kind}/${object.metadata?.name}`;
  const Model = object.apiVersion === "monitoring.coreos.com/v1" ? operator[object.kind] : undefined;
  if (!Model) {
    console.error(`${name}: no validator for ${object.apiVersion} ${object.kind}`);
    process.exit(2);
  }
  try {
    new Model(object).validate();
  } catch (e) {
    invalid += 1;
    console.log(`${name}: CRD schema: ${e.message}`);
  }
}
process.exit(invalid ? 1 : 0);
