// The captions of a row of pictures, shared by the report and the search page (inlined into each
// where "// @include captions.js" stands, by pipeline/webreport.py's template).
// A name too long for a caption is cut in the middle: its end (p02_q75_resized90.jpg's "resized90", a
// copy's suffix, a SKU's last digits) tells photos apart where its start does not; whole on hover.
function midCut(name, most = 19) {
  if (!name || name.length <= most) return name;
  // a photo's folder and name (SKU2001/front.jpg): the name kept whole where it leaves the folder room,
  // the folder cut in its middle (Robe…Ærø/side.jpg), not "front" cut to "ront"
  const slash = name.lastIndexOf("/"), file = name.slice(slash + 1);
  if (slash > 0 && file.length + 5 <= most) return midCut(name.slice(0, slash), most - file.length - 1) + "/" + file;
  const head = Math.ceil((most - 1) / 2), tail = most - 1 - head;
  return name.slice(0, head) + "…" + name.slice(name.length - tail);
}
// A group's captions, each cut to `most`: where cutting in the middle makes two alike (shop names
// that differ in a SKU mid-name: women-dr…ront.jpg twice), each from where the names part
function distinctCuts(names, most) {
  const cuts = names.map(n => midCut(n, most)), alike = new Map();
  cuts.forEach((c, i) => alike.set(c, [...(alike.get(c) || []), i]));
  for (const at of alike.values()) {  // only names cut alike, and only when they are not the same name
    const group = at.map(i => names[i]);
    if (at.length < 2 || new Set(group).size < group.length) continue;
    let common = 0;
    while (group.every(n => n.length > common && n[common] === group[0][common])) common++;
    at.forEach(i => { cuts[i] = midCut("…" + names[i].slice(Math.max(0, common - 2)), most); });
  }
  return cuts;
}
