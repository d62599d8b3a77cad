-- Lacuna for Neovim: starts `lacuna serve` through vim.lsp.config/enable and shows its suggestions
-- as ghost text (vim.lsp.inline_completion, Neovim 0.12+) or in the completion menu (0.11).
local M = {}

M.defaults = {
  cmd = { "lacuna", "serve" },
  filetypes = {
    "python", "javascript", "javascriptreact", "typescript", "typescriptreact",
    "go", "rust", "java", "c", "cpp",
  },
  -- The server's options, camelCase, sent as initializationOptions:
  -- maxTokens, candidates, modelDir, device, engineUrl, multiline, enabledLanguages, ...
  settings = {},
  -- Ghost text where Neovim has it; false: the completion menu.
  inline = true,
  -- Insert-mode keys; false turns one off, `keymaps = false` all of them.
  keymaps = {
    accept = "<Tab>", -- a normal Tab when no suggestion is shown
    accept_word = "<M-Right>",
    accept_line = "<M-C-Right>",
    next = "<M-]>",
    prev = "<M-[>",
    dismiss = "<C-]>",
  },
}

M.enabled = true -- :LacunaToggle
M.set_up = false -- whether setup() registered the server
M.options = M.defaults -- what setup() was given, over the defaults
local NAME = "lacuna"

local function has_inline()
  return vim.lsp.inline_completion ~= nil and M.options.inline
end

local function clients()
  return vim.lsp.get_clients({ name = NAME })
end

--- Accept the part of the shown suggestion that `cut` takes from what is left of it; the whole
--- suggestion counts as accepted (its command tells the server), a part does not.
local function accept_part(cut)
  vim.lsp.inline_completion.get({
    on_accept = function(item)
      if type(item.insert_text) ~= "string" then -- a snippet (from another server): whole
        return vim.snippet.expand(item.insert_text.value)
      end
      local win = vim.api.nvim_get_current_win()
      local cursor = vim.api.nvim_win_get_cursor(win)
      local row, col = cursor[1] - 1, cursor[2]
      -- The suggestion starts where it was asked for; what was typed since is already in the buffer.
      local start, finish = item.range and item.range.start, item.range and item.range.end_
      local typed = ""
      if start and start.row == row and start.col <= col then
        typed = vim.api.nvim_buf_get_text(0, row, start.col, row, col, {})[1]
      end
      if item.insert_text:sub(1, #typed) ~= typed then
        return
      end
      local rest = item.insert_text:sub(#typed + 1)
      local part = cut(rest)
      local whole = #part == #rest
      local end_row, end_col = row, col
      if whole and finish and (finish.row > row or (finish.row == row and finish.col > col)) then
        end_row, end_col = finish.row, finish.col -- the auto-closed brackets it replaces
      end
      local lines = vim.split(part, "\n", { plain = true })
      vim.api.nvim_buf_set_text(0, row, col, end_row, end_col, lines)
      -- The cursor moves, so Neovim asks again: the server answers the rest from its cache.
      vim.api.nvim_win_set_cursor(win, { row + #lines, (#lines == 1 and col or 0) + #lines[#lines] })
      if whole and item.command then
        vim.lsp.get_client_by_id(item.client_id):exec_cmd(item.command, { bufnr = 0 })
      end
    end,
  })
end

--- The next word: spaces, then a word or a run of punctuation.
local function first_word(text)
  return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text
end

--- The rest of the line, or the next line when the rest starts with a line break.
local function first_line(text)
  return text:match("^\n?[^\n]*")
end

local function dismiss(bufnr)
  return vim.lsp.inline_completion.get({ bufnr = bufnr, on_accept = function() end })
end

local function set_keymaps(bufnr)
  local keys = M.options.keymaps
  if not keys then
    return
  end
  local inline = vim.lsp.inline_completion
  local function map(name, rhs, opts)
    if keys[name] then
      local defaults = { buffer = bufnr, desc = "Lacuna: " .. name }
      vim.keymap.set("i", keys[name], rhs, vim.tbl_extend("force", defaults, opts or {}))
    end
  end
  -- expr mappings: without a suggestion the key does what it does anyway.
  map("accept", function()
    return inline.get() and "" or keys.accept
  end, { expr = true })
  map("dismiss", function()
    return dismiss() and "" or keys.dismiss
  end, { expr = true })
  map("accept_word", function()
    accept_part(first_word)
  end)
  map("accept_line", function()
    accept_part(first_line)
  end)
  map("next", function()
    inline.select({ count = 1 })
  end)
  map("prev", function()
    inline.select({ count = -1 })
  end)
end

-- Classic completion asks on these characters (the server sends no trigger characters).
local TRIGGERS = { " ", ".", "(", "[", "{", ",", ":", "=" }

local function enable_classic(client, bufnr, enable)
  local provider = client.server_capabilities.completionProvider
  if provider then
    provider.triggerCharacters = provider.triggerCharacters or TRIGGERS
  end
  vim.lsp.completion.enable(enable, client.id, bufnr, { autotrigger = true })
end

-- Neovim inserts a plain-text item's first word only: put in the rest of a multi-line suggestion.
local function complete_whole_item()
  local item = vim.v.completed_item
  local lsp = vim.tbl_get(item, "user_data", "nvim", "lsp") or {}
  local client = lsp.client_id and vim.lsp.get_client_by_id(lsp.client_id)
  local edit = vim.tbl_get(lsp, "completion_item", "textEdit")
  if not (client and client.name == NAME and edit) or edit.newText == item.word then
    return
  end
  -- Vim is still finishing the completion during CompleteDone (an edit then gets a stray
  -- character): edit after it.
  vim.schedule(function()
    local row, col = unpack(vim.api.nvim_win_get_cursor(0))
    local lines = vim.split(edit.newText, "\n", { plain = true })
    vim.api.nvim_buf_set_text(0, row - 1, col - #item.word, row - 1, col, lines)
    local last_col = (#lines == 1 and col - #item.word or 0) + #lines[#lines]
    vim.api.nvim_win_set_cursor(0, { row + #lines - 1, last_col })
  end)
end

local function on_attach(client, bufnr)
  if has_inline() then
    vim.lsp.inline_completion.enable(M.enabled, { bufnr = bufnr })
    set_keymaps(bufnr)
  else
    enable_classic(client, bufnr, M.enabled)
    local autocmd = { buffer = bufnr, group = "lacuna" } -- once, though a restarted server attaches again
    vim.api.nvim_clear_autocmds(vim.tbl_extend("force", autocmd, { event = "CompleteDone" }))
    vim.api.nvim_create_autocmd("CompleteDone", vim.tbl_extend("force", autocmd, { callback = complete_whole_item }))
  end
end

function M.toggle()
  M.enabled = not M.enabled
  -- Per buffer: a client-wide switch would be overridden by the buffer's own.
  for _, client in ipairs(clients()) do
    for bufnr in pairs(client.attached_buffers) do
      if has_inline() then
        vim.lsp.inline_completion.enable(M.enabled, { bufnr = bufnr })
      else
        enable_classic(client, bufnr, M.enabled)
      end
    end
  end
  vim.notify("Lacuna: suggestions " .. (M.enabled and "on" or "off"))
end

local function format_status(status)
  local function field(value, unit)
    return value == vim.NIL and "-" or tostring(value) .. (unit or "")
  end
  local latency = status.lastLatencyMs ~= vim.NIL and ("%.0f ms"):format(status.lastLatencyMs) or "-"
  return table.concat({
    "Lacuna: " .. field(status.server),
    "  model: " .. field(status.model) .. (status.ready and "" or " (loading)"),
    "  device: " .. field(status.device),
    "  last latency: " .. latency,
    "  accepted: " .. field(status.accepted),
    "  suggestions: " .. (M.enabled and "on" or "off"),
  }, "\n")
end

function M.status()
  local running = clients()
  if #running == 0 then
    vim.notify("Lacuna: no server running (open a file of a configured filetype; see :checkhealth lacuna)",
      vim.log.levels.WARN)
    return
  end
  for _, client in ipairs(running) do
    client:request("workspace/executeCommand", { command = "lacuna.status", arguments = {} }, function(err, result)
      if err then
        vim.notify("Lacuna: status failed: " .. err.message, vim.log.levels.ERROR)
      else
        vim.notify(format_status(result))
      end
    end)
  end
end

--- Whether the server command can run: the reason it cannot, or nil.
function M.missing_command()
  local cmd = M.options.cmd
  if type(cmd) == "table" and vim.fn.executable(cmd[1]) == 0 then
    return ("%s not found on PATH (pip install lacuna-lsp, or set cmd in require('lacuna').setup)"):format(cmd[1])
  end
end

function M.setup(opts)
  M.options = vim.tbl_extend("force", M.defaults, opts or {})
  if M.options.keymaps then
    M.options.keymaps = vim.tbl_extend("force", M.defaults.keymaps, M.options.keymaps)
  end
  if vim.fn.has("nvim-0.11") == 0 then
    vim.notify("Lacuna needs Neovim 0.11 or newer", vim.log.levels.ERROR)
    return
  end
  -- Said once here: otherwise Neovim would fail to spawn it for every buffer opened.
  local missing = M.missing_command()
  if missing then
    vim.notify("Lacuna: " .. missing, vim.log.levels.ERROR)
    return
  end
  vim.lsp.config(NAME, {
    cmd = M.options.cmd,
    filetypes = M.options.filetypes,
    -- An empty Lua table would go out as a JSON list, which the server rejects.
    init_options = next(M.options.settings) and M.options.settings or nil,
  })
  local group = vim.api.nvim_create_augroup("lacuna", { clear = true })
  vim.api.nvim_create_autocmd("LspAttach", {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME then
        on_attach(client, args.buf)
      end
    end,
  })
  vim.api.nvim_create_autocmd("LspDetach", {
    group = group,
    callback = function(args)
      -- A restarted server's old suggestion must not stay on screen (or be accepted).
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME and has_inline() then
        dismiss(args.buf)
      end
    end,
  })
  vim.lsp.enable(NAME)
  M.set_up = true
end

return M
