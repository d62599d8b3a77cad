-- :checkhealth lacuna
local M = {}

function M.check()
  local lacuna = require("lacuna")
  vim.health.start("lacuna")
  local version = tostring(vim.version())
  if vim.lsp.inline_completion then
    vim.health.ok("Neovim " .. version .. ": ghost text (vim.lsp.inline_completion)")
  elseif vim.fn.has("nvim-0.11") == 1 then
    vim.health.warn("Neovim " .. version .. ": no inline completion, suggestions go to the completion menu",
      "Neovim 0.12 or newer shows them as ghost text")
  else
    vim.health.error("Neovim " .. version .. " is too old", "Lacuna needs Neovim 0.11 or newer")
  end

  local cmd = lacuna.options.cmd
  local missing = lacuna.missing_command()
  if missing then
    vim.health.error(missing)
  elseif type(cmd) == "table" then
    vim.health.ok("server command: " .. table.concat(cmd, " ") .. " (" .. vim.fn.exepath(cmd[1]) .. ")")
  end

  if not lacuna.set_up then
    vim.health.warn("require('lacuna').setup() has not been called")
    return
  end
  local clients = vim.lsp.get_clients({ name = "lacuna" })
  if #clients == 0 then
    vim.health.info("no server running: it starts with a file of type " .. table.concat(lacuna.options.filetypes, ", "))
  end
  for _, client in ipairs(clients) do
    vim.health.ok(("server running (client %d), attached to %d buffer(s)"):format(
      client.id, vim.tbl_count(client.attached_buffers)))
  end
  vim.health.info("suggestions " .. (lacuna.enabled and "on" or "off") .. " (:LacunaToggle)")
end

return M
