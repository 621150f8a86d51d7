// Writes generated/<dashboard>.ts for every ../dashboards/*.json: the dashboard as a TypeScript literal
// typed with Grafana's own schema types (@grafana/schema), so that `tsc --strict` rejects misspelled or
// unknown fields (excess property checks), wrong types and values outside an enum. Each panel's options
// and custom field config are typed with its plugin's types (timeseries, stat); a panel type without
// types here is an error. `npm run check` = this, then tsc.
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dashboards = process.argv[2] ?? join(here, "..", "dashboards");
const out = join(here, "generated");
const raw = "@grafana/schema/dist/esm/raw/composable";
const PLUGINS = {
  timeseries: { options: "TimeSeriesOptions", custom: "TimeSeriesFieldConfig" },
  stat: { options: "StatOptions", custom: null },
};

const header = `import type { Dashboard, Panel, RowPanel } from "@grafana/schema";
import type { Options as TimeSeriesOptions, FieldConfig as TimeSeriesFieldConfig } from "${raw}/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";
import type { Options as StatOptions } from "${raw}/stat/panelcfg/x/StatPanelCfg_types.gen";

// JSON spells a string enum's members as their values: accept exactly those values (\`\${E}\`)
type Json<T> = T extends string ? \`\${T}\` : T extends (infer U)[] ? Json<U>[] : T extends object ? { [K in keyof T]: Json<T[K]> } : T;
`;

function literal(value, refs) {
  let text = JSON.stringify(value, null, 2);
  for (const [marker, name] of refs) text = text.replace(JSON.stringify(marker), name);
  return text;
}

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
let failed = false;
for (const file of readdirSync(dashboards).filter((f) => f.endsWith(".json"))) {
  const dash = JSON.parse(readFileSync(join(dashboards, file), "utf8"));
  const lines = [header];
  const refs = [];
  const panelRef = (panel, where) => {
    const id = `${where}_${panel.id ?? refs.length}`.replace(/[^A-Za-z0-9_]/g, "_");
    if (panel.type === "row") {
      const inner = (panel.panels ?? []).map((p) => panelRef(p, `${id}_in`));
      const copy = { ...panel, panels: inner.map((r) => r.marker) };
      lines.push(`const ${id}: Json<RowPanel> = ${literal(copy, inner.map((r) => [r.marker, r.name]))};`);
    } else {
      const types = PLUGINS[panel.type];
      if (!types) {
        console.error(`${file}: panel ${panel.id} "${panel.title}" has type ${panel.type}, which has no types here (generate.mjs PLUGINS)`);
        failed = true;
        return { marker: `@@${id}`, name: "undefined as never" };
      }
      const copy = { ...panel };
      const local = [];
      if (panel.options !== undefined) {
        lines.push(`const ${id}_options: Json<${types.options}> = ${literal(panel.options, [])};`);
        copy.options = `@@${id}_options`;
        local.push([`@@${id}_options`, `${id}_options`]);
      }
      const custom = panel.fieldConfig?.defaults?.custom;
      if (custom !== undefined && types.custom) {
        lines.push(`const ${id}_custom: Json<${types.custom}> = ${literal(custom, [])};`);
        copy.fieldConfig = { ...panel.fieldConfig, defaults: { ...panel.fieldConfig.defaults, custom: `@@${id}_custom` } };
        local.push([`@@${id}_custom`, `${id}_custom`]);
      }
      lines.push(`const ${id}: Json<Panel> = ${literal(copy, local)};`);
    }
    return { marker: `@@${id}`, name: id };
  };
  const top = (dash.panels ?? []).map((p) => panelRef(p, "panel"));
  const copy = { ...dash, panels: top.map((r) => r.marker) };
  lines.push(`export const dashboard: Json<Dashboard> = ${literal(copy, top.map((r) => [r.marker, r.name]))};`);
  writeFileSync(join(out, basename(file, ".json") + ".ts"), lines.join("\n\n") + "\n");
}
if (failed) process.exit(1);
