// The txt2img reply (A1111's TextToImageResponse: images, parameters, info) shown as a gallery of figures.

// The reply's `info`: a JSON string in A1111 (an object from some servers); {} when it cannot be read.
export function parseInfo(info) {
  if (info && typeof info === "object") return info;
  try {
    return JSON.parse(info || "{}");
  } catch {
    return {};
  }
}

// A base64 PNG (A1111 sends bare base64; a data URL is kept as it is) as a data URL.
function dataUrl(image) {
  return image.startsWith("data:") ? image : `data:image/png;base64,${image}`;
}

// The seed of image i: A1111 puts a grid first when index_of_first_image is 1; null for the grid.
function seedOf(info, i) {
  const first = info.index_of_first_image || 0;
  if (i < first) return null;
  const seeds = info.all_seeds || [];
  return seeds[i - first] ?? info.seed ?? null;
}

// A download name as A1111's "[number]-[seed]" pattern: job timestamp, image number, seed.
function fileName(info, i) {
  const seed = seedOf(info, i);
  const stamp = String(info.job_timestamp || "image").replace(/[^0-9A-Za-z_-]/g, "");
  return `${stamp}-${i + 1}-${seed === null ? "grid" : seed}.png`;
}

// One <figure>: the image, its parameters text and a download link.
function figure(image, infotext, info, i) {
  const src = dataUrl(image);
  const item = document.createElement("figure");
  item.className = "result";
  const img = document.createElement("img");
  img.src = src;
  img.alt = `Generated image ${i + 1}` + (info.prompt ? `: ${info.prompt}` : "");
  if (info.width && info.height) {
    img.width = info.width;
    img.height = info.height;
  }
  const caption = document.createElement("figcaption");
  const text = document.createElement("pre");
  text.className = "infotext";
  text.textContent = infotext;
  const link = document.createElement("a");
  link.href = src;
  link.download = fileName(info, i);
  link.className = "download";
  link.textContent = `Download ${link.download}`;
  caption.append(text, link);
  item.append(img, caption);
  return item;
}

// Put the reply's images first in the gallery, newest job on top; returns the parsed info.
export function showImages(gallery, reply) {
  const info = parseInfo(reply.info);
  const infotexts = info.infotexts || [];
  const images = reply.images || [];
  const figures = images.map((image, i) => figure(image, infotexts[i] || "", info, i));
  gallery.prepend(...figures);
  return info;
}
