// Calls to this server's AUTOMATIC1111 API (/sdapi/v1) and its errors as readable text.
// URLs are relative to the page (same origin), so HTTP Basic credentials the browser holds go with each call.
const BASE = "sdapi/v1/";

export class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    this.status = status;
    this.field = field;  // the request field the server blames, when it says
  }
}

// GET `path` (no body) or POST `body` as JSON; the parsed JSON reply, or an ApiError with a readable message.
export async function api(path, { body, method } = {}) {
  const init = { method: method || (body === undefined ? "GET" : "POST"), credentials: "same-origin",
                 cache: "no-store" };
  if (body !== undefined) {
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(BASE + path, init);
  } catch (e) {
    throw new ApiError(0, `Cannot reach the server (${e.message}).`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;  // not JSON: the raw text is the message
  }
  if (!response.ok) throw new ApiError(response.status, errorMessage(response, data, text), blamedField(data));
  return data;
}

// The message of an error reply: FastAPI's {"detail": str | [{loc, msg}]}, A1111's {"error", "errors"}, or text.
export function errorMessage(response, data, text) {
  const status = response.status;
  if (status === 401) return "The server needs a user name and password (HTTP 401): reload the page to sign in.";
  const fields = data && typeof data === "object" ? [data.detail, data.message, data.errors, data.error] : [];
  let what = fields.map(describe).find(Boolean) || (text || "").trim().slice(0, 300) || response.statusText;
  if (status === 429) {
    const wait = response.headers.get("Retry-After");
    what = `The server is busy: ${what}` + (wait ? ` Try again in ${wait} s.` : "");
  }
  return `${what} (HTTP ${status})`;
}

// The field an error body names: {"field": "width"}, or the first pydantic {loc: ["body", "width"]}.
function blamedField(data) {
  if (!data || typeof data !== "object") return null;
  if (typeof data.field === "string") return data.field;
  const first = Array.isArray(data.detail) ? data.detail[0] : null;
  const loc = first && Array.isArray(first.loc) ? first.loc.filter((part) => part !== "body") : [];
  return typeof loc[0] === "string" ? loc[0] : null;
}

// One error detail as text: a string, pydantic's {loc, msg} items ("width: ..."), or JSON for anything else.
export function describe(detail) {
  if (detail === null || detail === undefined || detail === "") return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map(describe).filter(Boolean).join("; ");
  if (typeof detail === "object" && "msg" in detail) {
    const loc = Array.isArray(detail.loc) ? detail.loc.filter((part) => part !== "body").join(".") : "";
    return loc ? `${loc}: ${detail.msg}` : String(detail.msg);
  }
  return typeof detail === "object" ? JSON.stringify(detail) : String(detail);
}
