// PNG Info: an A1111 PNG sent to POST /sdapi/v1/png-info, its parsed parameters put into the form fields.
import { api } from "./api.js";

// A1111's parse_generation_parameters keys -> the id of the input they fill.
const INPUTS = { "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps",
                 "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width", "Size-2": "height" };
// Keys that name an entry of a select: key -> select id.
const SELECTS = { "Sampler": "sampler_name", "Schedule type": "scheduler" };

// The file's bytes as bare base64 (what PNGInfoRequest.image takes).
function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// Select the option whose value, text or alias (data-aliases) matches `wanted`, ignoring case; false if none.
function choose(select, wanted) {
  const key = String(wanted).trim().toLowerCase();
  for (const option of select.options) {
    const names = [option.value, option.textContent, ...(option.dataset.aliases || "").split("\n")];
    if (names.some((name) => name && name.toLowerCase() === key)) {
      select.value = option.value;
      return true;
    }
  }
  return false;
}

// Fill the form from parsed parameters; returns the notes about values that could not be used.
export function applyParameters(params) {
  const notes = [];
  for (const [key, id] of Object.entries(INPUTS)) {
    if (params[key] !== undefined && params[key] !== null) document.getElementById(id).value = params[key];
  }
  for (const [key, id] of Object.entries(SELECTS)) {
    const value = params[key];
    if (value === undefined || value === null || value === "") continue;
    if (!choose(document.getElementById(id), value)) notes.push(`${key} "${value}" is not available here`);
  }
  return notes;
}

// Load the parameters of a PNG file into the form; the status text, or an Error with a readable message.
export async function loadPng(file) {
  if (!file) throw new Error("No file was given.");
  const reply = await api("png-info", { body: { image: await readBase64(file) } });
  if (!reply || !reply.info) throw new Error(`${file.name} has no AUTOMATIC1111 parameters in it.`);
  const params = reply.parameters || {};
  if (Object.keys(params).length === 0) throw new Error(`The server did not parse the parameters of ${file.name}.`);
  const notes = applyParameters(params);
  return `Loaded the parameters of ${file.name}` + (notes.length ? `; ${notes.join("; ")}.` : ".");
}
